"""Faults survived in seconds (issue 13): databases stopped, processes killed.

Three homeservers on PostgreSQL, the relay and the recipient each on a PostgreSQL
server of their own (crash-safe: synchronous commits), so that a test can stop one
(`PostgresCluster.halt`, as a crash) and start it again:

- `a`: the sender, `send.relays: {b: [r]}`;
- `r`: the relay, holding mail for anyone;
- `b`: the recipient, collecting from `r` at start-up (and otherwise only when
  asked, or when its database comes back after an outage: `poll_interval: 1h`).

alice (on a) and bob (on b) share a room. Each test states what must hold: nothing
answered 200 is lost, nothing reaches clients twice, 5xx only while a database is
down; and prints how long recovery took (run with `-s` to see the figures).
"""

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest

from synapse_relay.loopback import Homeserver, PostgresCluster, wait_until
from synapse_relay.protocol import relay_txn_path, send_relay_path
from tests.harness.fedclient import FakeServer, FakeServerFactory
from tests.harness.homeserver import (
    HomeserverFactory,
    send_text,
    shared_room,
    start_all,
)
from tests.harness.postgres import Backend

pytestmark = pytest.mark.integration

COMMON_CONFIG = {"presence": {"enabled": False}}
# How long each database outage lasts.
OUTAGE_S = 3.0
# Messages waiting on the relay when the recipient starts collecting.
BACKLOG = 30
# Delivery after a fault must resume within this many seconds.
RECOVERY_WITHIN_S = 10.0


@dataclass
class Net:
    a: Homeserver
    r: Homeserver
    b: Homeserver
    r_db: PostgresCluster
    b_db: PostgresCluster
    room: str
    tokens: dict[str, str]

    def send(self, text: str) -> str:
        """alice says `text`; the event id."""
        return send_text(self.a, self.tokens["alice"], self.room, text)

    def queued_for_b(self) -> int:
        response = self.r.client(
            "GET", "/_synapse/relay/v1/queues", self.tokens["r-admin"]
        )
        assert response.status_code == 200, response.text
        return sum(
            q["transactions"]
            for q in response.json()["queues"]
            if q["destination"] == self.b.server_name
        )

    def bodies_seen_by_bob(self) -> Counter[str]:
        """How many times each message body is in the room, as bob's client sees
        it (empty while b cannot answer)."""
        try:
            response = self.b.client(
                "GET",
                f"/_matrix/client/v3/rooms/{quote(self.room)}/messages",
                self.tokens["bob"],
                params={"dir": "b", "limit": 1000},
            )
        except OSError:
            return Counter()
        if response.status_code != 200:
            return Counter()
        return Counter(
            event["content"].get("body")
            for event in response.json()["chunk"]
            if event["type"] == "m.room.message"
        )

    def wait_until_bob_has(self, bodies: list[str], timeout: float) -> float:
        """Wait until bob sees every one of `bodies`; when that was (monotonic)."""
        wait_until(
            lambda: set(bodies) <= set(self.bodies_seen_by_bob()),
            timeout,
            interval=0.1,
            message=f"bob sees all {len(bodies)} messages",
        )
        return time.monotonic()

    def assert_each_once(self) -> None:
        twice = {body for body, n in self.bodies_seen_by_bob().items() if n > 1}
        assert not twice, f"delivered more than once: {sorted(twice)}"

    def backlog_on_r(self, prefix: str) -> list[str]:
        """b stopped, alice sends BACKLOG messages, all deposited on r."""
        if self.b.is_running:
            self.b.stop()
        before = self.queued_for_b()
        bodies = [f"{prefix} {i}" for i in range(BACKLOG)]
        for body in bodies:
            self.send(body)
        wait_until(
            lambda: self.queued_for_b() >= before + 1 and self.a_sent_all(),
            30,
            message="the backlog deposited on r",
        )
        return bodies

    def a_sent_all(self) -> bool:
        """a has recorded every event of the room as sent to b (to r, here)."""
        path = f"/_synapse/admin/v1/federation/destinations/{self.b.server_name}"
        token = self.tokens["alice"]
        sent = self.a.client("GET", path, token).json()
        rooms = self.a.client("GET", path + "/rooms", token).json()["rooms"]
        position = sent.get("last_successful_stream_ordering") or 0
        return bool(rooms) and all(r["stream_ordering"] <= position for r in rooms)

    def start_b_and_wait_for_first_ack(self, backlog: int) -> None:
        """Start b (it collects at start-up) and return once r deleted its first
        entry: b is in the middle of its collection."""
        self.b.launch()
        wait_until(
            lambda: self.queued_for_b() < backlog,
            60,
            interval=0.01,
            message="b acknowledged its first entry",
        )


@pytest.fixture(scope="module")
def net(
    pg_cluster: PostgresCluster, tmp_path_factory: pytest.TempPathFactory, tls_cert: Any
) -> Iterator[Net]:
    # Crash-safe: what PostgreSQL acknowledged as committed survives halt().
    with (
        PostgresCluster(crash_safe=True) as r_db,
        PostgresCluster(crash_safe=True) as b_db,
    ):
        factory = HomeserverFactory(
            tmp_path_factory.mktemp("faults"), tls_cert, Backend.postgres(pg_cluster)
        )
        try:
            # push off: b's mail reaches it by its collection only
            r = factory.create(
                {"relay": {"enabled": True, "destinations": ["*"], "push": False}},
                COMMON_CONFIG,
                backend=Backend.postgres(r_db),
                start=False,
            )
            b = factory.create(
                {"receive": {"relays": [r.server_name], "poll_interval": "1h"}},
                COMMON_CONFIG,
                backend=Backend.postgres(b_db),
                start=False,
            )
            a = factory.create(
                {"send": {"relays": {b.server_name: [r.server_name]}}},
                COMMON_CONFIG,
                start=False,
            )
            start_all([a, r, b])
            tokens = {
                "alice": a.register_user("alice", admin=True),
                "bob": b.register_user("bob"),
                "r-admin": r.register_user("admin", admin=True),
            }
            room = shared_room(a, tokens["alice"], [(b, tokens["bob"])])
            yield Net(a, r, b, r_db, b_db, room, tokens)
        finally:
            factory.stop_all()


@dataclass
class Deposit:
    origin: int
    seq: int
    code: int
    sent: float
    answered: float


def test_relay_database_stopped_under_deposit_load(
    net: Net, fake_servers: FakeServerFactory
) -> None:
    """Deposits go on while r's PostgreSQL is stopped and started again: every
    deposit answered 200 is kept, in order per origin; the others got 5xx, and
    only while the database was down."""
    owner = fake_servers.create()
    origins = [fake_servers.create() for _ in range(4)]
    results: list[Deposit] = []
    stop = threading.Event()

    def deposit_until_stopped(index: int) -> None:
        origin, seq = origins[index], 0
        while not stop.is_set():
            body = {"pdus": [], "edus": [{"edu_type": "org.example", "content": {}}]}
            sent = time.monotonic()
            try:
                code = origin.request(
                    "PUT",
                    net.r,
                    send_relay_path(f"txn-{seq}", owner.server_name),
                    content=body,
                ).status_code
            except OSError:
                code = 0  # no answer at all
            results.append(Deposit(index, seq, code, sent, time.monotonic()))
            seq += 1

    def answered_200_since(t: float) -> bool:
        return any(d.code == 200 and d.sent > t for d in list(results))

    with ThreadPoolExecutor(len(origins)) as pool:
        futures = [pool.submit(deposit_until_stopped, i) for i in range(len(origins))]
        try:
            wait_until(lambda: len(results) >= 20, 30, message="deposits flowing")
            halted = time.monotonic()
            net.r_db.halt()
            time.sleep(OUTAGE_S)  # the outage itself, not a synchronisation
            resumed = time.monotonic()  # starting it again
            net.r_db.resume()
            wait_until(
                lambda: answered_200_since(resumed + 1),
                RECOVERY_WITHIN_S + 1,
                interval=0.02,
                message="deposits answered 200 again",
            )
        finally:
            stop.set()
            for future in futures:
                future.result()

    # when the first deposit made since the database stopped was answered 200
    recovered = min(d.answered for d in results if d.code == 200 and d.sent > halted)
    failed = [d for d in results if d.code != 200]
    print(
        f"\nrelay database down {resumed - halted:.1f} s under load:"
        f" {len(results)} deposits, {len(failed)} not 200"
        f" ({dict(Counter(d.code for d in failed))}); deposits answered 200 again"
        f" {recovered - resumed:.2f} s after it was started again"
    )
    assert all(500 <= d.code < 600 for d in failed), Counter(d.code for d in failed)
    assert all(halted <= d.answered and d.sent <= recovered for d in failed)
    assert recovered - resumed < RECOVERY_WITHIN_S
    # Nothing answered 200 is lost, and each origin's entries come in order.
    collected = collect_all(owner, net.r)
    for index, origin in enumerate(origins):
        accepted = [d.seq for d in results if d.origin == index and d.code == 200]
        kept = collected.get(origin.server_name, [])
        assert set(accepted) <= set(kept)
        assert kept == sorted(kept)


def collect_all(owner: FakeServer, relay: Homeserver) -> dict[str, list[int]]:
    """Collect `owner`'s whole mailbox from `relay`: the sequence numbers of each
    origin's transactions, in the order handed out."""
    collected: dict[str, list[int]] = {}
    acknowledge = 0
    while True:
        response = owner.request(
            "GET",
            relay,
            relay_txn_path(owner.server_name),
            content={"entry_id": acknowledge},
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        if not answer["entries_queued"]:
            return collected
        transaction = answer["transaction"]
        seq = int(transaction["transaction_id"].removeprefix("txn-"))
        collected.setdefault(transaction["origin"], []).append(seq)
        acknowledge = answer["entry_id"]


def recovery_after(
    net: Net, prefix: str, fault: Callable[[], None], restore: Callable[[], None]
) -> tuple[float, float]:
    """b collects a backlog from r; `fault` strikes in the middle of the
    collection, `restore` repairs it. Seconds from the repair until delivery
    resumed (r deleted an entry b acknowledged), and until bob sees every message,
    each once."""
    bodies = net.backlog_on_r(prefix)
    backlog = net.queued_for_b()
    net.start_b_and_wait_for_first_ack(backlog)
    fault()
    left = net.queued_for_b()
    restore()
    restored = time.monotonic()
    if not net.b.is_running:
        net.b.start()
    wait_until(
        lambda: net.queued_for_b() < left,
        60,
        interval=0.02,
        message="b acknowledged an entry again",
    )
    resumed = time.monotonic()
    done = net.wait_until_bob_has(bodies, 90)
    net.assert_each_once()
    assert net.queued_for_b() == 0
    return resumed - restored, done - restored


def test_recipient_database_stopped_mid_collection(net: Net) -> None:
    def outage() -> None:
        net.b_db.halt()
        time.sleep(OUTAGE_S)  # the outage itself, not a synchronisation

    resumed, done = recovery_after(net, "db outage", outage, net.b_db.resume)
    print(
        f"\nrecipient database down {OUTAGE_S:.0f} s mid-collection: delivery resumed"
        f" {resumed:.2f} s after it was back, all {BACKLOG} messages delivered after"
        f" {done:.2f} s"
    )
    assert resumed < RECOVERY_WITHIN_S


def test_recipient_killed_mid_collection(net: Net) -> None:
    def restart() -> None:
        net.b.start()

    resumed, done = recovery_after(net, "b killed", net.b.kill, restart)
    print(
        f"\nrecipient killed (-9) mid-collection: delivery resumed {resumed:.2f} s"
        f" after it was healthy again, all {BACKLOG} messages delivered after"
        f" {done:.2f} s"
    )
    assert resumed < RECOVERY_WITHIN_S


def test_sender_killed_mid_fallback(net: Net) -> None:
    """a is killed while it deposits a burst for the down b: every message alice
    got 200 for reaches bob once b and a are back; after a's restart b, which
    answers, gets a's traffic directly from the first transaction."""
    if net.b.is_running:
        net.b.stop()
    answered: list[str] = []

    def burst() -> None:
        for i in range(BACKLOG):
            body = f"burst {i}"
            try:
                net.send(body)
            except (OSError, AssertionError):
                return  # a is gone
            answered.append(body)

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(burst)
        wait_until(lambda: len(answered) >= 5, 30, message="the burst under way")
        net.a.kill()
        future.result()
    assert 5 <= len(answered) < BACKLOG

    net.b.start()
    net.a.start()
    restarted = time.monotonic()
    # The next message goes directly, and makes b fetch what a had not sent.
    net.send("after the restart")
    direct = net.wait_until_bob_has(["after the restart"], 60)
    done = net.wait_until_bob_has(answered, 90)
    net.assert_each_once()
    response = net.a.client("GET", "/_synapse/relay/v1/status", net.tokens["alice"])
    send = response.json()["send"]
    print(
        f"\nsender killed (-9) mid-fallback after {len(answered)} messages: the next"
        f" message delivered {direct - restarted:.2f} s after its restart"
        f" ({send['fallbacks']} fallbacks since), all after {done - restarted:.2f} s"
    )
    assert send["fallbacks"] == 0
    assert send["destinations"][net.b.server_name]["state"] == "up"
    assert direct - restarted < RECOVERY_WITHIN_S
