"""Issue 11: the key mailbox of a real relay, and a real server using it, with
fake owners, claimers and a fake relay that lies (signed keys made here).

The owner O is a FakeServer: its federation endpoints answer 503 (unreachable, as
Synapse sees it), its key server answers, so its snapshot signatures verify.
"""

import json
import threading
import time
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

from synapse_relay.keys import CLAIMS_PER_MINUTE, MAX_DEVICES_PER_CLAIM
from synapse_relay.protocol import KEY_SNAPSHOTS, KEYS_PREFIX, keys_path
from tests.harness.fedclient import FakeServer, FakeServerFactory, quote
from tests.harness.homeserver import Homeserver, HomeserverFactory
from tests.harness.tls_server import TlsJsonServer

pytestmark = pytest.mark.integration

ALGORITHM = "signed_curve25519"


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
def relay(homeserver_factory: HomeserverFactory) -> Homeserver:
    return homeserver_factory.create(
        {"relay": {"enabled": True, "destinations": ["*"]}}
    )


@pytest.fixture
def owner(fake_servers: FakeServerFactory) -> Owner:
    server = Owner(fake_servers.cert).start()
    fake_servers.servers.append(server)
    return server


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
    snapshot = owner.snapshot("alice", [phone, laptop], sign=False)
    del snapshot["fallback_keys"]["LAPTOP"]
    snapshot = sign_json(snapshot, owner.server_name, owner.signing_key)
    body = {
        "snapshots": [snapshot],
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

    threads = [threading.Thread(target=claim_many, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
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
    homeserver_factory: HomeserverFactory,
    relay: Homeserver,
    owner: Owner,
    tls_cert: tuple[Path, Path],
) -> None:
    """H cannot reach O; O's relay L lies about O's keys. H's clients get O's keys
    only when L serves them as O signed them."""
    liar = LyingRelay(tls_cert).start()
    try:
        server = homeserver_factory.create(
            {"send": {"relays": {owner.server_name: [liar.server_name]}}}
        )
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
    finally:
        liar.stop()
