"""Issue 11: the key mailbox on real homeservers, both backends.

- The relay's endpoints, with fake owners and claimers (signed keys made here):
  concurrent claims and uploads, bad uploads and claims. The owner O is a
  FakeServer whose federation endpoints answer 503 (unreachable, as Synapse sees
  it) and whose key server answers, so its snapshot signatures verify.
- A server using a relay L that lies about O's keys (tampered, forged).
- Real clients (matrix-nio, E2EE): alice (A) and bob (B) share an encrypted room; R
  is a relay of both. B goes offline; alice logs in on a new device and sends 3
  messages from it (its Olm session with bob's device starts from a one-time key of
  bob's that B escrowed on R); A goes offline; B comes back and collects: bob
  decrypts all 3 and lists alice's new device, learned from A's keys on R while A
  is offline.
"""

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from signedjson.key import (
    encode_verify_key_base64,
    generate_signing_key,
    get_verify_key,
)
from signedjson.sign import sign_json
from unpaddedbase64 import encode_base64

from synapse_relay.keys.snapshot import CLAIMS_PER_MINUTE, MAX_DEVICES_PER_CLAIM
from synapse_relay.loopback import HTTP_TIMEOUT, wait_until
from synapse_relay.loopback_workers import WorkerSpec
from synapse_relay.protocol import KEY_SNAPSHOTS, KEYS_PREFIX, keys_path
from tests.harness.client import Client
from tests.harness.fedclient import FakeServer, FakeServerFactory, quote
from tests.harness.homeserver import Homeserver, HomeserverFactory
from tests.harness.postgres import Backend
from tests.harness.tls_server import TlsJsonServer

pytestmark = pytest.mark.integration

ALGORITHM = "signed_curve25519"
TIMEOUT = 60


class Device:
    """A device's keys, signed with its own ed25519 key as a client signs them."""

    def __init__(self, user_id: str, device_id: str) -> None:
        self.user_id, self.device_id = user_id, device_id
        self._key = generate_signing_key(device_id)
        self._next = 0
        self.keys = self.sign(
            {
                "user_id": user_id,
                "device_id": device_id,
                "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
                "keys": {
                    f"ed25519:{device_id}": encode_verify_key_base64(
                        get_verify_key(self._key)
                    ),
                    f"curve25519:{device_id}": encode_base64(device_id.encode() * 4),
                },
            }
        )

    def sign(self, obj: dict[str, Any]) -> dict[str, Any]:
        signed: dict[str, Any] = sign_json(obj, self.user_id, self._key)
        return signed

    def one_time_keys(self, n: int) -> dict[str, dict[str, Any]]:
        keys = {}
        for _ in range(n):
            self._next += 1
            key_id = f"{ALGORITHM}:{self.device_id}{self._next}"
            keys[key_id] = self.sign({"key": encode_base64(key_id.encode())})
        return keys

    def fallback_key(self) -> dict[str, dict[str, Any]]:
        return {
            f"{ALGORITHM}:fb{self.device_id}": self.sign(
                {
                    "key": encode_base64(b"fallback" + self.device_id.encode()),
                    "fallback": True,
                }
            )
        }


class Owner(FakeServer):
    """A key owner whose federation endpoints are down (503)."""

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        code, answer = super().handle(method, path, body)
        if code == 404:
            return 503, {"errcode": "M_UNKNOWN", "error": "down"}
        return code, answer

    def snapshot(
        self,
        user: str,
        devices: list[Device],
        fallback: bool = True,
        ts: int | None = None,
        sign: bool = True,
    ) -> dict[str, Any]:
        user_id = f"@{user}:{self.server_name}"
        content = {
            "user_id": user_id,
            "stream_id": 1,
            "devices": [{"device_id": d.device_id, "keys": d.keys} for d in devices],
            "fallback_keys": {
                d.device_id: d.fallback_key() for d in devices if fallback
            },
            "ts": int(time.time() * 1000) if ts is None else ts,
        }
        if not sign:
            return content
        signed: dict[str, Any] = sign_json(content, self.server_name, self.signing_key)
        return signed

    def upload(
        self, relay: Homeserver, body: Any, origin: FakeServer | None = None
    ) -> requests.Response:
        return (origin or self).request(
            "POST", relay, keys_path(self.server_name, "/upload"), content=body
        )

    def holdings(self, relay: Homeserver) -> dict[str, Any]:
        response = self.request("GET", relay, keys_path(self.server_name, "/stock"))
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result


class LyingRelay(TlsJsonServer):
    """Answers every key-mailbox request with `answers[kind]` (kind: the path's
    last part: a user ID for devices, "query", "claim"), checks nothing."""

    def __init__(self, cert: tuple[Path, Path]) -> None:
        super().__init__(cert)
        self.answers: dict[str, Any] = {}

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        path = urlsplit(path).path
        if path.startswith(KEYS_PREFIX) and path.rsplit("/", 1)[-1] in self.answers:
            return 200, self.answers[path.rsplit("/", 1)[-1]]
        return 404, {"errcode": "M_UNRECOGNIZED", "error": "lying relay"}


@pytest.fixture(scope="module")
def owner(fake_servers: FakeServerFactory) -> Owner:
    server = Owner(fake_servers.cert).start()
    fake_servers.servers.append(server)
    return server


@pytest.fixture(scope="module")
def liar(tls_cert: tuple[Path, Path]) -> Iterator[LyingRelay]:
    with LyingRelay(tls_cert) as server:
        yield server


@pytest.fixture(scope="module")
def servers(
    homeserver_factory: HomeserverFactory, owner: Owner, liar: LyingRelay
) -> tuple[Homeserver, Homeserver, Homeserver]:
    """A and B, relays of each other on R; A also uses the lying relay L for O."""
    r = homeserver_factory.create({"relay": {"enabled": True, "destinations": ["*"]}})
    a = homeserver_factory.create(start=False)
    b = homeserver_factory.create(start=False)
    for me, other, more in (
        (a, b, {owner.server_name: [liar.server_name]}),
        (b, a, {}),
    ):
        me.module_config = {
            "send": {"relays": {other.server_name: [r.server_name], **more}},
            "receive": {
                "relays": [r.server_name],
                "poll_interval": "500ms",
                "key_upload_interval": "1s",
            },
        }
    a.start()
    b.start()
    return a, r, b


@pytest.fixture(scope="module")
def relay(servers: tuple[Homeserver, Homeserver, Homeserver]) -> Homeserver:
    return servers[1]


def claim(
    claimer: FakeServer, relay: Homeserver, owner: Owner, wanted: dict[str, Any]
) -> requests.Response:
    return claimer.request(
        "POST",
        relay,
        keys_path(owner.server_name, "/user/keys/claim"),
        content={"one_time_keys": wanted},
    )


def test_concurrent_claims_hand_each_key_out_once_then_the_fallback_key(
    relay: Homeserver, owner: Owner, fake_servers: FakeServerFactory
) -> None:
    user_id = f"@alice:{owner.server_name}"
    phone, laptop = Device(user_id, "PHONE"), Device(user_id, "LAPTOP")

    def snapshot(ts: int) -> dict[str, Any]:
        content = owner.snapshot("alice", [phone, laptop], ts=ts, sign=False)
        del content["fallback_keys"]["LAPTOP"]
        signed: dict[str, Any] = sign_json(
            content, owner.server_name, owner.signing_key
        )
        return signed

    now = int(time.time() * 1000)
    body = {
        "snapshots": [snapshot(now)],
        "one_time_keys": {user_id: {"PHONE": phone.one_time_keys(10)}},
    }
    assert owner.upload(relay, body).status_code == 200
    assert owner.holdings(relay)["one_time_key_counts"] == {
        user_id: {"PHONE": {ALGORITHM: 10}}
    }
    claimers = [fake_servers.create(), fake_servers.create()]
    got: list[list[str]] = [[], []]

    def claim_many(index: int) -> None:
        for _ in range(8):
            response = claim(
                claimers[index], relay, owner, {user_id: {"PHONE": ALGORITHM}}
            )
            assert response.status_code == 200, response.text
            got[index] += list(response.json()["one_time_keys"][user_id]["PHONE"])

    uploaded: list[int] = []

    def upload_many(index: int) -> None:
        # newer snapshots of the same devices, uploaded by two at once meanwhile
        for ts in range(now + 1 + index, now + 7, 2):
            response = owner.upload(relay, {"snapshots": [snapshot(ts)]})
            assert response.status_code == 200, response.text
            uploaded.append(ts)

    threads = [threading.Thread(target=claim_many, args=(i,)) for i in (0, 1)]
    threads += [threading.Thread(target=upload_many, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(uploaded) == list(range(now + 1, now + 7))
    # the newest snapshot is held, whichever upload committed last
    assert owner.holdings(relay)["users"][user_id] == now + 6
    claimed = got[0] + got[1]
    one_time = [k for k in claimed if not k.startswith(f"{ALGORITHM}:fb")]
    assert len(claimed) == 16
    assert sorted(one_time) == sorted(set(one_time)) and len(one_time) == 10
    assert claimed.count(f"{ALGORITHM}:fbPHONE") == 6
    assert owner.holdings(relay)["one_time_key_counts"] == {}
    # a device without one-time keys nor a fallback key: nothing, as federation does
    response = claim(claimers[0], relay, owner, {user_id: {"LAPTOP": ALGORITHM}})
    assert response.status_code == 200
    assert response.json()["one_time_keys"] == {}


def test_bad_uploads_are_refused_and_change_nothing(
    relay: Homeserver, owner: Owner, fake_servers: FakeServerFactory
) -> None:
    user_id = f"@bob:{owner.server_name}"
    phone = Device(user_id, "PHONE")
    good = owner.snapshot("bob", [phone])
    assert owner.upload(relay, {"snapshots": [good]}).status_code == 200
    before = owner.holdings(relay)
    stranger = fake_servers.create()
    other = Device(f"@carol:{stranger.server_name}", "X")
    forged = Device(user_id, "PHONE")  # same device ID, another key
    tampered = owner.snapshot("bob", [phone], sign=False)
    tampered["devices"][0]["keys"] = {**phone.keys, "keys": forged.keys["keys"]}
    tampered = sign_json(tampered, owner.server_name, owner.signing_key)
    huge = owner.snapshot("bob", [phone], sign=False)
    huge["padding"] = "x" * 300_000
    huge = sign_json(huge, owner.server_name, owner.signing_key)
    unsigned_key = {f"{ALGORITHM}:nosig": {"key": "AAAA"}}
    cases: list[tuple[Any, int, str]] = [
        (
            {"snapshots": [owner.snapshot("bob", [phone], sign=False)]},
            400,
            "M_INVALID_SIGNATURE",
        ),
        ({"snapshots": [tampered]}, 400, "M_INVALID_SIGNATURE"),
        (
            {
                "snapshots": [
                    sign_json(
                        {
                            **owner.snapshot("carol", [other], sign=False),
                            "user_id": other.user_id,
                        },
                        owner.server_name,
                        owner.signing_key,
                    )
                ]
            },
            403,
            "M_FORBIDDEN",
        ),
        ({"snapshots": [huge]}, 413, "M_TOO_LARGE"),
        ({"snapshots": "all of them"}, 400, "M_BAD_JSON"),
        ({"snapshots": [good, good]}, 400, "M_BAD_JSON"),
        (
            {"snapshots": [good], "one_time_keys": {user_id: {"PHONE": unsigned_key}}},
            400,
            "M_INVALID_SIGNATURE",
        ),
        (
            {
                "snapshots": [good],
                "one_time_keys": {user_id: {"PHONE": phone.one_time_keys(11)}},
            },
            400,
            "M_BAD_JSON",
        ),
        (
            {
                "snapshots": [],
                "one_time_keys": {user_id: {"PHONE": phone.one_time_keys(1)}},
            },
            400,
            "M_BAD_JSON",
        ),
    ]
    for body, code, errcode in cases:
        response = owner.upload(relay, body)
        assert (response.status_code, response.json().get("errcode")) == (
            code,
            errcode,
        ), (body if len(json.dumps(body)) < 2000 else "huge", response.text)
    # the owner only: another server cannot replace bob's snapshot
    response = owner.upload(relay, {"snapshots": [good]}, origin=stranger)
    assert response.status_code == 403
    response = stranger.request("GET", relay, keys_path(owner.server_name, "/stock"))
    assert response.status_code == 403
    assert owner.holdings(relay) == before


def test_bad_claims_are_refused(
    relay: Homeserver, owner: Owner, fake_servers: FakeServerFactory
) -> None:
    user_id = f"@dave:{owner.server_name}"
    phone = Device(user_id, "PHONE")
    body = {
        "snapshots": [owner.snapshot("dave", [phone])],
        "one_time_keys": {user_id: {"PHONE": phone.one_time_keys(1)}},
    }
    assert owner.upload(relay, body).status_code == 200
    claimer = fake_servers.create()
    many = {user_id: {f"D{i}": ALGORITHM for i in range(MAX_DEVICES_PER_CLAIM + 1)}}
    cases: list[tuple[Any, int]] = [
        ({f"@nobody:{owner.server_name}": {"PHONE": ALGORITHM}}, 404),
        ({user_id: {"TABLET": ALGORITHM}}, 404),
        ({f"@eve:{claimer.server_name}": {"PHONE": ALGORITHM}}, 400),
        (many, 400),
        ({user_id: {"PHONE": 7}}, 400),
        ("everything", 400),
    ]
    for wanted, code in cases:
        response = claim(claimer, relay, owner, wanted)
        assert response.status_code == code, (wanted, response.text)
    # nothing was handed out: the one key is still there
    assert owner.holdings(relay)["one_time_key_counts"][user_id] == {
        "PHONE": {ALGORITHM: 1}
    }
    # a flood from one server is cut off; others still get keys
    flooder = fake_servers.create()
    unknown = {user_id: {f"U{i}": ALGORITHM for i in range(MAX_DEVICES_PER_CLAIM)}}
    codes = [
        claim(flooder, relay, owner, unknown).status_code
        for _ in range(CLAIMS_PER_MINUTE // MAX_DEVICES_PER_CLAIM + 1)
    ]
    assert codes[-1] == 429 and set(codes[:-1]) == {404}
    response = claim(
        fake_servers.create(), relay, owner, {user_id: {"PHONE": ALGORITHM}}
    )
    assert response.status_code == 200
    assert list(response.json()["one_time_keys"][user_id]["PHONE"]) == [
        f"{ALGORITHM}:PHONE1"
    ]


def test_a_server_uses_only_keys_its_owner_and_devices_signed(
    servers: tuple[Homeserver, Homeserver, Homeserver], owner: Owner, liar: LyingRelay
) -> None:
    """A cannot reach O; O's relay L lies about O's keys. A's clients get O's keys
    only when L serves them as O signed them."""
    server = servers[0]
    token = server.register_user("henry")
    user_id = f"@frank:{owner.server_name}"
    phone = Device(user_id, "PHONE")
    genuine = owner.snapshot("frank", [phone])
    tampered = json.loads(json.dumps(genuine))
    tampered["devices"][0]["keys"]["keys"]["curve25519:PHONE"] = "Zm9yZ2Vk"

    def query() -> dict[str, Any]:
        response = server.client(
            "POST",
            "/_matrix/client/v3/keys/query",
            token=token,
            json={"device_keys": {user_id: []}},
        )
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()["device_keys"].get(user_id, {})
        return result

    def answer(snapshot: dict[str, Any]) -> dict[str, Any]:
        return {
            "device_keys": {user_id: {"PHONE": snapshot["devices"][0]["keys"]}},
            KEY_SNAPSHOTS: {user_id: snapshot},
        }

    def serve(snapshot: dict[str, Any]) -> None:
        liar.answers["query"] = answer(snapshot)
        liar.answers[quote(user_id)] = {
            **snapshot,
            KEY_SNAPSHOTS: {user_id: snapshot},
        }

    serve(tampered)
    assert query() == {}
    serve(genuine)
    got = query()
    assert got["PHONE"]["keys"] == phone.keys["keys"]
    # a claimed key must be signed by the device as O's snapshot lists it
    forged = Device(user_id, "PHONE").one_time_keys(1)
    real = phone.one_time_keys(1)
    for keys, expected in ((forged, {}), (real, real)):
        liar.answers["claim"] = {
            "one_time_keys": {user_id: {"PHONE": keys}},
            KEY_SNAPSHOTS: {user_id: genuine},
        }
        response = server.client(
            "POST",
            "/_matrix/client/v3/keys/claim",
            token=token,
            json={"one_time_keys": {user_id: {"PHONE": ALGORITHM}}},
        )
        assert response.status_code == 200, response.text
        assert (
            response.json()["one_time_keys"].get(user_id, {}).get("PHONE", {})
            == expected
        )


def test_generic_workers_ask_relays_too(
    backend: Backend,
    homeserver_factory: HomeserverFactory,
    owner: Owner,
    liar: LyingRelay,
) -> None:
    """A client's key query and claim served by a generic worker reach O's relay."""
    if str(backend) != "postgres":
        pytest.skip("Synapse workers need PostgreSQL")
    server = homeserver_factory.create_with_workers(
        {"send": {"relays": {owner.server_name: [liar.server_name]}}},
        workers=(WorkerSpec("client1", ("client",)),),
    )
    worker = server.workers["client1"]
    token = server.register_user("ivy")
    user_id = f"@grace:{owner.server_name}"
    phone = Device(user_id, "PHONE")
    snapshot = owner.snapshot("grace", [phone])
    key = phone.one_time_keys(1)
    liar.answers.update(
        {
            "query": {KEY_SNAPSHOTS: {user_id: snapshot}},
            quote(user_id): {**snapshot, KEY_SNAPSHOTS: {user_id: snapshot}},
            "claim": {
                "one_time_keys": {user_id: {"PHONE": key}},
                KEY_SNAPSHOTS: {user_id: snapshot},
            },
        }
    )

    def call(path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = requests.post(
            f"{worker.base_url}/_matrix/client/v3/keys/{path}",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            verify=False,
            timeout=HTTP_TIMEOUT,
        )
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    query = call("query", {"device_keys": {user_id: []}})
    assert query["device_keys"][user_id]["PHONE"]["keys"] == phone.keys["keys"]
    claim = call("claim", {"one_time_keys": {user_id: {"PHONE": ALGORITHM}}})
    assert claim["one_time_keys"][user_id]["PHONE"] == key
    # answered by the worker itself, not handed to the main process
    log = worker.log_path.read_text()
    assert "answered its claim request from relay" in log


def all_sent(homeserver: Homeserver, token: str, destination: Homeserver) -> bool:
    """Whether `homeserver` sent (directly or through relays) every event it has
    for `destination` (Synapse's admin federation API)."""
    path = "/_synapse/admin/v1/federation/destinations/" + quote(
        destination.server_name
    )
    sent = homeserver.client("GET", path, token=token).json()
    rooms = homeserver.client("GET", path + "/rooms", token=token).json()["rooms"]
    last = sent.get("last_successful_stream_ordering") or 0
    return all(room["stream_ordering"] <= last for room in rooms)


def held_devices(
    fake: FakeServer, relay: Homeserver, server: Homeserver, user_id: str
) -> set[str]:
    response = fake.request(
        "GET",
        relay,
        keys_path(server.server_name, "/user/devices/") + quote(user_id),
    )
    if response.status_code != 200:
        return set()
    return {d["device_id"] for d in response.json()["devices"]}


def escrow_left(homeserver: Homeserver, token: str, relay: Homeserver) -> int:
    """The one-time keys `homeserver` last saw escrowed on `relay` (admin status)."""
    status = homeserver.client("GET", "/_synapse/relay/v1/status", token=token)
    left: int = status.json()["receive_keys"]["stock_left"].get(relay.server_name, 0)
    return left


def test_new_device_messages_decrypt_while_each_side_is_offline(
    servers: tuple[Homeserver, Homeserver, Homeserver],
    fake_servers: FakeServerFactory,
    tmp_path: Path,
) -> None:
    """Last in this module: it leaves A stopped."""
    a, r, b = servers
    fake = fake_servers.create()
    for homeserver, name in ((a, "alice"), (b, "bob")):
        homeserver.register_user(name)
    admin_a, admin_b = (s.register_user("admin", admin=True) for s in (a, b))
    alice_id, bob_id = a.user_id("alice"), b.user_id("bob")
    with (
        Client(a, "alice", tmp_path / "alice1") as alice1,
        Client(b, "bob", tmp_path / "bob") as bob,
    ):
        room_id = alice1.create_room(encrypted=True, invite=[bob_id])
        bob.sync_until(lambda: room_id in bob.nio.invited_rooms, TIMEOUT, "invite")
        bob.join(room_id)
        alice1.sync_until(
            lambda: bob_id in alice1.nio.rooms[room_id].users, TIMEOUT, "bob's join"
        )
        # bob's device and one-time keys escrowed on R, before B goes offline
        wait_until(
            lambda: (
                bob.device_id in held_devices(fake, r, b, bob_id)
                and escrow_left(b, admin_b, r) > 0
            ),
            TIMEOUT,
            message="bob's keys on R",
        )
        b.stop()

        with Client(a, "alice", tmp_path / "alice2") as alice2:
            alice2.sync_until(lambda: room_id in alice2.nio.rooms, TIMEOUT, "the room")
            wait_until(
                lambda: alice2.device_id in held_devices(fake, r, a, alice_id),
                TIMEOUT,
                message="alice's new device's keys on R",
            )
            sent = [f"secret {i} from a new device" for i in range(3)]
            for text in sent:
                alice2.send_text(room_id, text)
            wait_until(lambda: all_sent(a, admin_a, b), TIMEOUT, message="deposits")
            a.stop()

            b.start()
            bob.sync_until(
                lambda: set(sent) <= set(bob.texts(room_id)), TIMEOUT, "the messages"
            )
            decrypted = [t for t in bob.texts(room_id) if t in sent]
            print(
                "sent from a new device while B was offline: 3, decrypted: "
                + str(len(decrypted))
            )
            assert decrypted == sent
            bob.sync_until(
                lambda: (
                    alice2.device_id
                    in {
                        d.id for d in bob.nio.device_store.active_user_devices(alice_id)
                    }
                ),
                TIMEOUT,
                "alice's new device",
            )
