"""The receive role between real homeservers (the seed's P2P Node B).

Each backend (SQLite, PostgreSQL) gets four homeservers with the module:

- `a`: alice's server; its send role deposits what it sends to `b` on `r` when
  `b` is down (`send.relays: {b: [r]}`);
- `r`: the relay, holding mail for anyone;
- `b`: bob's server, collecting its mail from `r`, at start-up and on the admin
  `collect` (its poll interval is an hour, so that nothing else collects);
- `c`: collecting every second from `r` and from `liar`, a fake relay
  (tests/harness/fake_relay.py) that hands out whatever a test gives it.

alice (on `a`) and bob (on `b`) share a room, joined while all servers are up.
Presence is off everywhere, so that a message is the only thing `a` sends `b`.
"""

import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg2
import pytest

from tests.harness.fake_relay import FakeRelay
from tests.harness.fedclient import FakeServer, FakeServerFactory, quote
from tests.harness.homeserver import Homeserver, HomeserverFactory, wait_until

pytestmark = pytest.mark.integration

QUIET = {"presence": {"enabled": False}}
BATCH_COLLECT = "/_matrix/federation/unstable/synapse_relay/collect/"
# How long B may take, once healthy, to show what its start-up collection got.
COLLECTION_DEADLINE = 30


@dataclass
class Net:
    a: Homeserver
    r: Homeserver
    b: Homeserver
    c: Homeserver
    liar: FakeRelay
    sender: FakeServer
    room_id: str
    alice: str
    bob: str
    r_admin: str
    b_admin: str
    c_admin: str


@pytest.fixture(scope="module")
def net(
    homeserver_factory: HomeserverFactory,
    fake_servers: FakeServerFactory,
    tls_cert: Any,
) -> Iterator[Net]:
    with FakeRelay(tls_cert) as liar:
        # push off: what reaches b here must come through its collection
        r = homeserver_factory.create(
            {"relay": {"enabled": True, "destinations": ["*"], "push": False}}, QUIET
        )
        b = homeserver_factory.create(None, QUIET, start=False)
        b.module_config = {
            "receive": {"relays": [r.server_name], "poll_interval": "1h"}
        }
        a = homeserver_factory.create(
            {"send": {"relays": {b.server_name: [r.server_name]}}}, QUIET
        )
        b.start()
        c = homeserver_factory.create(
            {
                "receive": {
                    "relays": [r.server_name, liar.server_name],
                    "poll_interval": "1s",
                }
            },
            QUIET,
        )
        alice = a.register_user("alice")
        bob = b.register_user("bob")
        room_id = ok(
            a.client(
                "POST",
                "/_matrix/client/v3/createRoom",
                alice,
                {"preset": "public_chat", "name": "relayed"},
            )
        )["room_id"]
        ok(
            b.client(
                "POST",
                f"/_matrix/client/v3/join/{quote(room_id)}",
                bob,
                {},
                params={"server_name": a.server_name},
            )
        )
        # Bob's server joined with partial state: wait for the full state (the
        # members list waits for it), so that it needs nothing from a later.
        ok(b.client("GET", f"/_matrix/client/v3/rooms/{quote(room_id)}/members", bob))
        # and alice's server sees bob joined before b goes away
        wait_until(
            lambda: b.user_id("bob") in joined_members(a, alice, room_id),
            20,
            message="bob joined on a",
        )
        yield Net(
            a=a,
            r=r,
            b=b,
            c=c,
            liar=liar,
            sender=fake_servers.create(),
            room_id=room_id,
            alice=alice,
            bob=bob,
            r_admin=r.register_user("admin", admin=True),
            b_admin=b.register_user("admin", admin=True),
            c_admin=c.register_user("admin", admin=True),
        )
    # homeserver_factory stops the homeservers after the module


# --- helpers ------------------------------------------------------------------------


def ok(response: Any) -> Any:
    assert response.status_code == 200, f"{response.status_code} {response.text}"
    return response.json()


def joined_members(hs: Homeserver, token: str, room_id: str) -> dict:
    path = f"/_matrix/client/v3/rooms/{quote(room_id)}/joined_members"
    return ok(hs.client("GET", path, token))["joined"]  # type: ignore[no-any-return]


def ensure_running(*servers: Homeserver) -> None:
    for server in servers:
        if not server.is_running:
            server.start()


def send_message(net: Net, body: str) -> str:
    path = "/_matrix/client/v3/rooms/{}/send/m.room.message/{}".format(
        quote(net.room_id), quote(f"{body}-{time.monotonic_ns()}")
    )
    event = ok(
        net.a.client("PUT", path, net.alice, {"msgtype": "m.text", "body": body})
    )
    return event["event_id"]  # type: ignore[no-any-return]


def queued_for(net: Net, destination: str) -> int:
    """How many transactions `r` holds for `destination`."""
    queues = ok(net.r.client("GET", "/_synapse/relay/v1/queues", net.r_admin))
    for queue in queues["queues"]:
        if queue["destination"] == destination:
            return queue["transactions"]  # type: ignore[no-any-return]
    return 0


def send_while_b_is_down(net: Net, bodies: list[str]) -> None:
    """alice sends `bodies` one at a time, each once a's send role deposited the
    previous one on r (so that each message is its own transaction)."""
    assert not net.b.is_running
    for body in bodies:
        before = queued_for(net, net.b.server_name)
        send_message(net, body)

        def deposited(before: int = before) -> bool:
            return queued_for(net, net.b.server_name) > before

        wait_until(deposited, 20, interval=0.02, message=f"{body!r} deposited on r")


def timeline(hs: Homeserver, token: str, room_id: str) -> list[str]:
    """The bodies of the room's messages on `hs`, oldest first."""
    path = f"/_matrix/client/v3/rooms/{quote(room_id)}/messages"
    chunk = ok(hs.client("GET", path, token, params={"dir": "b", "limit": 1000}))
    return [
        event["content"].get("body")
        for event in reversed(chunk["chunk"])
        if event["type"] == "m.room.message"
    ]


def wait_for_messages(net: Net, bodies: list[str], timeout: float) -> list[str]:
    """Wait until bob's timeline on b holds all of `bodies`; the timeline."""
    wanted = set(bodies)

    def arrived() -> list[str]:
        messages = timeline(net.b, net.bob, net.room_id)
        return messages if wanted <= set(messages) else []

    return wait_until(arrived, timeout, interval=0.2, message="messages on b")


def receive_status(hs: Homeserver, token: str) -> dict:
    return ok(hs.client("GET", "/_synapse/relay/v1/status", token))["receive"]  # type: ignore[no-any-return]


def relay_counters(hs: Homeserver, token: str, relay: str) -> dict:
    zero = dict.fromkeys(("collected", "processed", "rejected", "failures"), 0)
    return {**zero, **receive_status(hs, token)["relays"].get(relay, {})}


def collect(hs: Homeserver, token: str) -> dict:
    return ok(hs.client("POST", "/_synapse/relay/v1/collect", token))  # type: ignore[no-any-return]


def deposit(net: Net, destination: str, body: dict, txn_id: str) -> None:
    """The fake server `sender` deposits `body` on r for `destination`."""
    path = "/_matrix/federation/v1/send_relay/{}/{}".format(
        quote(txn_id), quote(f"@_relay:{destination}")
    )
    ok(net.sender.request("PUT", net.r, path, content=body))


def expire_keys(hs: Homeserver, server_name: str) -> int:
    """Make every signing key of `server_name` that `hs` (stopped) holds expired
    long ago; how many it held."""
    assert not hs.is_running
    statements = [
        "UPDATE server_keys_json SET ts_valid_until_ms = 1 WHERE server_name = %s",
        "UPDATE server_signature_keys SET ts_valid_until_ms = 1 WHERE server_name = %s",
    ]
    if hs.database is None:
        with sqlite3.connect(hs.workdir / "homeserver.db") as connection:
            counts = [
                connection.execute(s.replace("%s", "?"), (server_name,)).rowcount
                for s in statements
            ]
    else:
        args = hs.database["args"]
        connection = psycopg2.connect(
            host=args["host"],
            port=args["port"],
            user=args["user"],
            dbname=args["database"],
        )
        try:
            with connection, connection.cursor() as cursor:
                counts = []
                for statement in statements:
                    cursor.execute(statement, (server_name,))
                    counts.append(cursor.rowcount)
        finally:
            connection.close()
    return counts[0]


# --- the seed's scenario: A -> R -> B -----------------------------------------------


def test_offline_recipient_gets_messages_through_relay(net: Net) -> None:
    ensure_running(net.a, net.r, net.b)
    net.b.stop()
    bodies = [f"while b is down {i}" for i in range(5)]
    send_while_b_is_down(net, bodies)
    net.a.stop()

    net.b.start()
    started = time.monotonic()
    messages = wait_for_messages(net, bodies, COLLECTION_DEADLINE)
    took = time.monotonic() - started
    assert messages[-len(bodies) :] == bodies
    wait_until(
        lambda: queued_for(net, net.b.server_name) == 0, 10, message="r's queue empty"
    )
    counters = relay_counters(net.b, net.b_admin, net.r.server_name)
    assert counters["processed"] == len(bodies)
    assert counters["rejected"] == counters["failures"] == 0
    print(f"messages on b {took:.1f}s after it answered /health")
    # b collected in batches (r, a synapse-relay, has the batch endpoint)
    log = net.r.log_path.read_text(encoding="utf-8", errors="replace")
    assert f"POST {BATCH_COLLECT}" in log


def test_origin_offline_with_expired_key(net: Net) -> None:
    """b's copy of a's key has expired and a is offline: b fetches a's key from
    the relay's notary endpoint, and accepts the messages."""
    ensure_running(net.a, net.r, net.b)
    net.b.stop()
    bodies = [f"with an expired key {i}" for i in range(3)]
    send_while_b_is_down(net, bodies)
    net.a.stop()
    assert expire_keys(net.b, net.a.server_name) >= 1

    net.b.start()
    messages = wait_for_messages(net, bodies, COLLECTION_DEADLINE)
    assert messages[-len(bodies) :] == bodies
    status = receive_status(net.b, net.b_admin)
    assert status["keys_fetched"] >= 1
    assert status["pdus_rejected"] == 0
    wait_until(
        lambda: queued_for(net, net.b.server_name) == 0, 10, message="r's queue empty"
    )


def test_kill_during_collection(net: Net) -> None:
    """b is killed (SIGKILL) in the middle of collecting many transactions; after
    a restart every message is in its timeline exactly once."""
    ensure_running(net.a, net.r, net.b)
    net.b.stop()
    count = 30
    bodies = [f"crash test {i}" for i in range(count)]
    send_while_b_is_down(net, bodies)
    queued = queued_for(net, net.b.server_name)
    assert queued >= count
    net.a.stop()

    net.b.start()

    def under_way() -> list[int]:
        n = queued_for(net, net.b.server_name)
        return [n] if n < queued else []

    remaining = wait_until(
        under_way, COLLECTION_DEADLINE, interval=0.01, message="b collecting"
    )[0]
    net.b.kill()
    left = queued_for(net, net.b.server_name)
    assert 0 < left <= remaining < queued, "b was not killed mid-collection"

    net.b.start()
    messages = wait_for_messages(net, bodies, COLLECTION_DEADLINE)
    crash = [m for m in messages if m.startswith("crash test")]
    assert crash == bodies, "each message exactly once, in order"
    wait_until(
        lambda: queued_for(net, net.b.server_name) == 0, 10, message="r's queue empty"
    )


# --- the admin API ------------------------------------------------------------------


def test_manual_collect(net: Net) -> None:
    ensure_running(net.r, net.b)
    collect(net.b, net.b_admin)  # whatever an earlier failed test left behind
    assert collect(net.b, net.b_admin) == {
        "processed": 0,
        "rejected": 0,
        "relays": {net.r.server_name: {"processed": 0, "rejected": 0, "error": None}},
    }
    # three transactions without PDUs from a fake server: fed, processed, acked
    for i in range(3):
        deposit(
            net,
            net.b.server_name,
            {"pdus": [], "edus": []},
            f"manual-{i}-{time.monotonic_ns()}",
        )
    assert queued_for(net, net.b.server_name) == 3
    result = collect(net.b, net.b_admin)
    assert result["processed"] == 3, result
    assert result["relays"][net.r.server_name]["error"] is None
    assert queued_for(net, net.b.server_name) == 0
    assert collect(net.b, net.b_admin)["processed"] == 0


def test_collect_needs_the_receive_role_and_an_admin(net: Net) -> None:
    ensure_running(net.r, net.b)
    response = net.r.client("POST", "/_synapse/relay/v1/collect", net.r_admin)
    assert response.status_code == 400
    assert "receive role is not enabled" in response.json()["error"]
    assert net.b.client("POST", "/_synapse/relay/v1/collect", net.bob).status_code == (
        403
    )
    assert net.b.client("POST", "/_synapse/relay/v1/collect").status_code == 401


# --- failures and lies --------------------------------------------------------------


def test_relay_unreachable_at_startup(net: Net) -> None:
    """c starts while r is down: c starts normally, and collects its mail once r
    is back (c polls every second)."""
    ensure_running(net.r, net.c)
    net.c.stop()
    deposit(
        net,
        net.c.server_name,
        {"pdus": [], "edus": []},
        f"while-r-down-{time.monotonic_ns()}",
    )
    net.r.stop()
    try:
        net.c.start()
        wait_until(
            lambda: relay_counters(net.c, net.c_admin, net.r.server_name)["failures"],
            10,
            message="c's collection from r failing",
        )
        assert relay_counters(net.c, net.c_admin, net.r.server_name)["processed"] == 0
    finally:
        net.r.start()
    wait_until(
        lambda: relay_counters(net.c, net.c_admin, net.r.server_name)["processed"],
        10,
        message="c collected from r",
    )
    assert queued_for(net, net.c.server_name) == 0


def test_lying_relay(net: Net) -> None:
    """A relay handing out a transaction destined to another server, or claiming
    to come from c itself: refused and acknowledged away, nothing processed."""
    ensure_running(net.c)
    liar = net.liar
    before = relay_counters(net.c, net.c_admin, liar.server_name)
    pdu = {
        "type": "m.room.message",
        "room_id": net.room_id,
        "sender": f"@mallory:{net.sender.server_name}",
        "content": {"msgtype": "m.text", "body": "not for you"},
    }
    lies = [
        liar.add(
            {
                "origin": net.sender.server_name,
                "destination": net.b.server_name,
                "origin_server_ts": 1,
                "transaction_id": "not-for-c",
                "pdus": [pdu],
                "edus": [],
            }
        ),
        liar.add(
            {
                "origin": net.c.server_name,
                "destination": net.c.server_name,
                "origin_server_ts": 1,
                "transaction_id": "from-c-itself",
                "pdus": [],
                "edus": [],
            }
        ),
    ]
    wait_until(
        lambda: liar.acknowledged[-2:] == lies, 10, message="lies acknowledged away"
    )
    after = relay_counters(net.c, net.c_admin, liar.server_name)
    assert after["rejected"] - before["rejected"] == 2
    assert after["processed"] == before["processed"]
    assert liar.entries == {}

    # A Dendrite-shaped transaction (no transaction_id) for c from an origin that
    # is not c: processed, under an id derived from its content.
    honest = liar.add(
        {
            "origin": net.sender.server_name,
            "destination": net.c.server_name,
            "origin_server_ts": 1,
            "pdus": [],
        }
    )
    wait_until(lambda: honest in liar.acknowledged, 10, message="collected")
    final = relay_counters(net.c, net.c_admin, liar.server_name)
    assert final["processed"] - after["processed"] == 1
    assert final["rejected"] == after["rejected"]


def test_relay_without_batch_collect_is_collected_with_relay_txn(net: Net) -> None:
    """liar, like Dendrite, answers the batch endpoint 404 M_UNRECOGNIZED: c
    collects from it with relay_txn, and does not ask for batches again before
    BATCH_RECHECK_MS (it polls every second)."""
    ensure_running(net.c)
    liar = net.liar
    entry = liar.add(
        {
            "origin": net.sender.server_name,
            "destination": net.c.server_name,
            "origin_server_ts": 1,
            "transaction_id": f"dendrite-{time.monotonic_ns()}",
            "pdus": [],
            "edus": [],
        }
    )
    wait_until(lambda: entry in liar.acknowledged, 10, message="collected")
    posts = [p for p in liar.paths if p.startswith("POST ")]
    assert posts and all(p.startswith(f"POST {BATCH_COLLECT}") for p in posts)
    # once per start of c (this module restarts it once)
    assert len(posts) <= 2, posts
    relay_txn = [p for p in liar.paths if p.startswith("GET ") and "/relay_txn/" in p]
    assert len(relay_txn) > len(posts)
    assert relay_counters(net.c, net.c_admin, liar.server_name)["processed"] >= 1
