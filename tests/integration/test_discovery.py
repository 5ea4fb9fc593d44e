"""Relay discovery between real homeservers (issue 10), on SQLite and PostgreSQL.

Each backend gets:

- `a`: the sender, with the module and NO send mapping at all; it refreshes
  advertisements every `INTERVAL` (instead of the hour by default);
- `r`, `r2`: relays that hold mail for every server that registered with them
  (`relay.serve_registered`), and list no destination;
- `b`: the recipient, whose only configuration is `receive.relays: [r]`;
- `c`: a plain Synapse without the module.

alice (a), bob (b) and carol (c) share a room, joined while all are up. The tests
run in order and share these servers.
"""

import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from signedjson.key import generate_signing_key
from signedjson.sign import sign_json

from synapse_relay.demo import User
from synapse_relay.discovery import advertisement_of
from tests.harness.fedclient import FakeServer, FakeServerFactory
from tests.harness.homeserver import Homeserver, HomeserverFactory, wait_until

pytestmark = pytest.mark.integration

INTERVAL_S = 5
COMMON_CONFIG = {"presence": {"enabled": False}}
RELAY_CONFIG = {"relay": {"enabled": True, "serve_registered": True}}
QUERY_PATH = "/_matrix/federation/v1/query/synapse_relay.relays"
# Generous for a loaded machine; a fallback takes well under a second when idle.
FALLBACK_WITHIN_S = 30
# Five homeservers start at once: on 2 busy cores that can take minutes.
START_TIMEOUT_S = 240


@dataclass
class Net:
    a: Homeserver
    r: Homeserver
    r2: Homeserver
    b: Homeserver
    c: Homeserver
    alice: User
    bob: User
    carol: User
    admins: dict[str, User]
    room: str

    def admin(self, homeserver: Homeserver, method: str, path: str) -> Any:
        response = homeserver.client(
            method,
            f"/_synapse/relay/v1/{path}",
            self.admins[homeserver.server_name].token,
        )
        assert response.status_code == 200, response.text
        return response.json()

    def relays_of_b(self) -> Any:
        return self.admin(self.a, "GET", f"relays/{self.b.server_name}")

    def registered(self, relay: Homeserver) -> list[str]:
        return [
            entry["server_name"]
            for entry in self.admin(relay, "GET", "registered")["registered"]
        ]

    def queued_for_b(self, relay: Homeserver) -> int:
        return sum(
            q["transactions"]
            for q in self.admin(relay, "GET", "queues")["queues"]
            if q["destination"] == self.b.server_name
        )

    def send(self, text: str) -> None:
        self.alice.send_text(self.room, text)

    def send_and_wait_on(self, relay: Homeserver, text: str) -> None:
        """alice says `text` while b is offline: it must reach `relay`."""
        before = self.queued_for_b(relay)
        self.send(text)
        wait_until(
            lambda: self.queued_for_b(relay) > before,
            FALLBACK_WITHIN_S,
            message=f"{text!r} deposited on {relay}",
        )

    def discovery_status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.admin(self.a, "GET", "status")
        return status


def queries_served(homeserver: Homeserver) -> int:
    """Relay advertisement queries in `homeserver`'s access log."""
    log = homeserver.log_path.read_text(encoding="utf-8", errors="replace")
    return sum(
        1
        for line in log.splitlines()
        if "synapse.access" in line and QUERY_PATH in line
    )


@pytest.fixture(scope="module")
def net(homeserver_factory: HomeserverFactory) -> Iterator[Net]:
    create = homeserver_factory.create
    r = create(RELAY_CONFIG, COMMON_CONFIG, start=False)
    r2 = create(RELAY_CONFIG, COMMON_CONFIG, start=False)
    b = create(
        {"receive": {"relays": [r.server_name], "poll_interval": "2s"}},
        COMMON_CONFIG,
        start=False,
    )
    c = create(None, COMMON_CONFIG, start=False)
    a = create(
        {"send": {"discover_interval": f"{INTERVAL_S}s"}}, COMMON_CONFIG, start=False
    )
    with ThreadPoolExecutor(5) as pool:
        for future in [
            pool.submit(hs.start, START_TIMEOUT_S) for hs in (a, r, r2, b, c)
        ]:
            future.result()
    alice = User(a, "alice", admin=True)
    bob, carol = User(b, "bob"), User(c, "carol")
    admins = {
        a.server_name: alice,
        r.server_name: User(r, "admin", admin=True),
        r2.server_name: User(r2, "admin", admin=True),
    }
    room: str = alice.call(
        "POST", "/createRoom", {"preset": "public_chat", "name": "discovered"}
    )["room_id"]
    for user in (bob, carol):
        user.call("POST", f"/join/{quote(room)}", {}, server_name=a.server_name)
        # Partial-state joins complete in the background; /members waits.
        user.call("GET", f"/rooms/{quote(room)}/members")
    yield Net(a, r, r2, b, c, alice, bob, carol, admins, room)


def test_sender_without_configuration_falls_back_to_discovered_relays(
    net: Net,
) -> None:
    b, r = net.b.server_name, net.r.server_name
    # b registered with r by collecting; a learnt b's relays after delivering.
    wait_until(lambda: b in net.registered(net.r), 30, message="b registered on r")
    net.send("hello, all up")
    found = wait_until(
        lambda: (view := net.relays_of_b())["source"] == "discovered" and view,
        30,
        message="a discovered b's relays",
    )
    assert found["relays"] == [r]
    assert found["discovered"]["ts"] <= found["discovered"]["fetched_ts"]
    assert found["discovered"]["valid_until_ts"] > time.time() * 1000
    listed = net.admin(net.a, "GET", "relays")["destinations"]
    assert [d["destination"] for d in listed if d["source"] == "discovered"] == [b]
    assert net.discovery_status()["discovery"]["fetched"] >= 1

    net.b.stop()
    net.send_and_wait_on(net.r, "t1 first while b is offline")
    net.send_and_wait_on(net.r, "t1 second while b is offline")
    assert net.discovery_status()["send"]["fallbacks_discovered"] >= 2

    # a restarted while b is offline falls back to the advertisement it stored
    net.a.restart()
    net.send_and_wait_on(net.r, "t1 third, after a restarted")
    assert net.discovery_status()["send"]["fallbacks_discovered"] >= 1

    net.a.stop()
    net.b.start()
    expected = [
        "t1 first while b is offline",
        "t1 second while b is offline",
        "t1 third, after a restarted",
    ]
    wait_until(
        lambda: [t for t in net.bob.texts(net.room) if t.startswith("t1 ")] == expected,
        60,
        message="bob received everything, in order",
    )
    assert net.queued_for_b(net.r) == 0
    net.a.start()


def test_a_destination_that_changes_its_relays_is_followed(net: Net) -> None:
    r, r2 = net.r.server_name, net.r2.server_name
    net.b.module_config = {"receive": {"relays": [r2], "poll_interval": "2s"}}
    net.b.restart()
    wait_until(
        lambda: net.b.server_name in net.registered(net.r2),
        30,
        message="b registered on r2",
    )

    def switched() -> bool:
        # Only a delivery to b makes a refresh its advertisement.
        net.send("t2 while b is up")
        return bool(net.relays_of_b()["relays"] == [r2])

    wait_until(switched, 4 * INTERVAL_S + 30, interval=1, message="a switched to r2")
    assert net.relays_of_b()["source"] == "discovered"

    net.b.stop()
    on_r = net.queued_for_b(net.r)
    net.send_and_wait_on(net.r2, "t2 while b is offline")
    assert net.queued_for_b(net.r) == on_r, "the old relay was used"
    assert r not in net.relays_of_b()["relays"]


def test_a_plain_destination_costs_one_query_per_interval(net: Net) -> None:
    # a has delivered to c since the room was made: c was asked, answered 404.
    assert queries_served(net.c) >= 1
    assert net.discovery_status()["discovery"]["no_module"] >= 1
    before = queries_served(net.c)
    started = time.monotonic()
    texts = [f"t3 burst {i}" for i in range(10)]
    for text in texts:
        net.send(text)
    wait_until(
        lambda: [t for t in net.carol.texts(net.room) if t.startswith("t3 ")] == texts,
        60,
        message="carol received the burst directly",
    )
    elapsed = time.monotonic() - started
    asked = queries_served(net.c) - before
    assert asked <= elapsed // INTERVAL_S + 1, (asked, elapsed)
    # c is left to Synapse: the send role holds no state for it
    destinations = net.discovery_status()["send"]["destinations"]
    assert net.c.server_name not in destinations
    assert net.relays_of_b()["relays"] == [net.r2.server_name]


class Impersonator(FakeServer):
    """Serves b's name (on b's port, while b is offline) with a key that has the
    id of b's key but is not b's, and an advertisement signed with it."""

    def __init__(self, cert: tuple[Path, Path], b: Homeserver, relay: str) -> None:
        super().__init__(cert)
        self.port = b.port
        self.b_name = b.server_name
        key_id = b.signing_key_path.read_text().split()[1]
        self.signing_key = generate_signing_key(key_id)
        self.relay = relay

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        if urlsplit(path).path == QUERY_PATH:
            self.received.append((method, path))
            now = int(time.time() * 1000)
            return 200, sign_json(
                advertisement_of((self.relay,), self.b_name, now),
                self.b_name,
                self.signing_key,
            )
        return super().handle(method, path, body)

    @property
    def server_name(self) -> str:
        return self.b_name


def test_a_forged_advertisement_is_refused(
    net: Net, fake_servers: FakeServerFactory
) -> None:
    assert not net.b.is_running
    evil = f"evil-{secrets.token_hex(4)}.example"
    impersonator = Impersonator(fake_servers.cert, net.b, evil).start()
    try:
        refused_before = net.discovery_status()["discovery"]["refused_signature"]
        answer = net.admin(net.a, "POST", f"relays/{net.b.server_name}/discover")
        assert answer["fetch"]["result"] == "refused", answer
        assert answer["fetch"]["reason"].startswith("signature"), answer
        assert impersonator.received, "the impersonator was not asked"
    finally:
        impersonator.stop()
    assert answer["relays"] == [net.r2.server_name]
    assert net.relays_of_b()["relays"] == [net.r2.server_name]
    status = net.discovery_status()["discovery"]
    assert status["refused_signature"] == refused_before + 1

    # the admin forgets what a discovered: b has no relays any more
    forgotten = net.admin(
        net.a, "DELETE", f"relays/{net.b.server_name}?discovered=true"
    )
    assert (forgotten["source"], forgotten["relays"]) == ("none", [])
    assert forgotten["discovered"] is None
