"""The three roles on a Synapse worker deployment (issue 13), on PostgreSQL.

One homeserver `w` runs as a main process and four workers, with Redis
(`synapse_relay.loopback_workers.STANDARD_WORKERS`):

- `federation1`, `federation2`: generic workers serving federation, so the relay
  role's endpoints (w holds mail for anyone);
- `sender1`: the federation sender, so the send role (w's relays of a destination
  are set through the admin API on the main process only);
- `background1`: runs background tasks, so the receive role (w collects from `p`)
  and the relay role's push (docs/push.rst).

`p` is a plain homeserver, a relay holding mail for anyone; `b` a plain homeserver
sharing a room with w. Fake federation servers deposit on w's workers, collect
from them and take the transactions w pushes. The deployment is shared by the
module's tests (starting workers is expensive).
"""

import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from signedjson.key import decode_verify_key_bytes, get_verify_key
from signedjson.sign import verify_signed_json
from unpaddedbase64 import decode_base64

from synapse_relay.directory import MAPPING_CACHE_MS
from synapse_relay.loopback import Homeserver, SynapseProcess, wait_until
from synapse_relay.loopback_workers import BACKGROUND_TASKS, FEDERATION_SENDER, Worker
from synapse_relay.protocol import (
    FEDERATION_PREFIX,
    ORIGIN_AUTH,
    RELAYS_QUERY_TYPE,
    relay_txn_path,
    send_relay_path,
)
from synapse_relay.push import PROBE_TIMEOUT_MS, SCAN_INTERVAL_MS
from tests.harness.fedclient import KEY_ID, FakeServer, FakeServerFactory
from tests.harness.homeserver import (
    HomeserverFactory,
    WorkerHomeserver,
    log_problems,
    send_text,
    shared_room,
    start_all,
)

pytestmark = [pytest.mark.integration, pytest.mark.workers]

COMMON_CONFIG = {"presence": {"enabled": False}}
RELAY = {"enabled": True, "destinations": ["*"]}
# 16 origins depositing 8 transactions each, one after the other, all at once
ORIGINS = 16
DEPOSITS_PER_ORIGIN = 8


@dataclass
class Deployment:
    w: WorkerHomeserver
    p: Homeserver
    b: Homeserver
    room: str
    tokens: dict[str, str]
    # when w's relays of b were set through the admin API on w's main process
    relays_set_at: float

    def admin(
        self, process: SynapseProcess, method: str, path: str, body: Any = None
    ) -> Any:
        token = self.tokens[self.p.server_name if process is self.p else "admin"]
        return process.client(method, f"/_synapse/relay/v1/{path}", token, body)

    def queued(self, relay: SynapseProcess, destination: str) -> int:
        """Transactions `relay` holds for `destination` (admin `queues`)."""
        response = self.admin(relay, "GET", "queues")
        assert response.status_code == 200, response.text
        return sum(
            q["transactions"]
            for q in response.json()["queues"]
            if q["destination"] == destination
        )

    def send(self, text: str) -> str:
        """alice@w says `text` in the room; the event id."""
        return send_text(self.w, self.tokens["alice"], self.room, text)

    def bob_has(self, event_id: str) -> bool:
        path = f"/_matrix/client/v3/rooms/{quote(self.room)}/event/{quote(event_id)}"
        return self.b.client("GET", path, self.tokens["bob"]).status_code == 200


@pytest.fixture(scope="module")
def net(postgres_factory: HomeserverFactory) -> Iterator[Deployment]:
    p = postgres_factory.create({"relay": RELAY}, COMMON_CONFIG, start=False)
    b = postgres_factory.create({}, COMMON_CONFIG, start=False)
    w = postgres_factory.create_with_workers(
        {"relay": RELAY, "receive": {"relays": [p.server_name], "poll_interval": "1h"}},
        COMMON_CONFIG,
        start=False,
    )
    start_all([w, p, b])
    tokens = {
        "admin": w.register_user("admin", admin=True),
        "alice": w.register_user("alice"),
        "bob": b.register_user("bob"),
        p.server_name: p.register_user("admin", admin=True),
    }
    # The send role's relays of b, set on the main process only: the federation
    # sender worker must pick them up from the database.
    response = w.client(
        "PUT",
        f"/_synapse/relay/v1/relays/{quote(b.server_name)}",
        tokens["admin"],
        {"relays": [p.server_name]},
    )
    assert response.status_code == 200, response.text
    relays_set_at = time.monotonic()
    room = shared_room(w, tokens["alice"], [(b, tokens["bob"])])
    yield Deployment(w, p, b, room, tokens, relays_set_at)


def deposit(
    origin: FakeServer, target: Homeserver | Worker, destination: str, seq: int
) -> int:
    """`origin` deposits its transaction number `seq` for `destination` on the
    process `target`; the HTTP status."""
    body = {
        "origin_server_ts": int(time.time() * 1000),
        "pdus": [],
        "edus": [{"edu_type": "org.example.seq", "content": {"seq": seq}}],
    }
    path = send_relay_path(f"txn-{seq}", destination)
    return origin.request("PUT", target, path, content=body).status_code


def test_relay_on_two_federation_workers(
    net: Deployment, fake_servers: FakeServerFactory
) -> None:
    """Concurrent deposits for one destination on both federation workers: no 5xx,
    nothing lost, first in first out per origin, the main process's `queues` right."""
    owner = fake_servers.create()
    origins = [fake_servers.create() for _ in range(ORIGINS)]
    readers = [net.w.workers["federation1"], net.w.workers["federation2"]]

    def deposit_all(index: int) -> list[int]:
        origin = origins[index]
        return [
            deposit(origin, readers[(index + seq) % 2], owner.server_name, seq)
            for seq in range(DEPOSITS_PER_ORIGIN)
        ]

    started = time.monotonic()
    with ThreadPoolExecutor(ORIGINS) as pool:
        codes = [
            code for codes in pool.map(deposit_all, range(ORIGINS)) for code in codes
        ]
    elapsed = time.monotonic() - started
    server_errors = sum(code >= 500 for code in codes)
    retried = sum(
        reader.log_path.read_text(errors="replace").count("could not serialize")
        for reader in readers
    )
    print(
        f"\n{len(codes)} deposits from {ORIGINS} origins on 2 federation workers in"
        f" {elapsed:.1f} s: {codes.count(200)} answered 200, {server_errors} 5xx,"
        f" {retried} PostgreSQL serialization failures retried by Synapse"
    )
    assert server_errors == 0, sorted(codes)
    assert codes == [200] * len(codes)
    # Deposits take turns on the destination's row lock at READ COMMITTED.
    assert retried == 0

    total = ORIGINS * DEPOSITS_PER_ORIGIN
    assert net.queued(net.w, owner.server_name) == total

    # The owner collects, alternating between the two workers.
    collected: dict[str, list[int]] = {}
    acknowledge = 0
    for request in range(total + 1):
        response = owner.request(
            "GET",
            readers[request % 2],
            relay_txn_path(owner.server_name),
            content={"entry_id": acknowledge},
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        if not answer["entries_queued"]:
            break
        transaction = answer["transaction"]
        seq = transaction["edus"][0]["content"]["seq"]
        assert transaction["transaction_id"] == f"txn-{seq}"
        collected.setdefault(transaction["origin"], []).append(seq)
        acknowledge = answer["entry_id"]
    assert collected == {
        origin.server_name: list(range(DEPOSITS_PER_ORIGIN)) for origin in origins
    }
    assert net.queued(net.w, owner.server_name) == 0


@dataclass(frozen=True)
class Send:
    """A `PUT /send` a destination received."""

    at: float  # time.monotonic()
    path: str
    authorization: str
    body: bytes


class PlainDestination(FakeServer):
    """A destination without the module that answers: it accepts every
    `PUT /send` and records it."""

    def __init__(self, cert: tuple[Path, Path]) -> None:
        super().__init__(cert)
        self.sends: list[Send] = []

    def handle_request(
        self, method: str, path: str, headers: Message, body: bytes
    ) -> tuple[int, Any]:
        if method == "PUT" and path.startswith(f"{FEDERATION_PREFIX}/send/"):
            authorization = headers.get("Authorization", "")
            self.sends.append(Send(time.monotonic(), path, authorization, body))
            return 200, {"pdus": {}}
        if method == "GET" and path == f"{FEDERATION_PREFIX}/version":
            return 200, {"server": {"name": "plain", "version": "1"}}
        return super().handle_request(method, path, headers, body)


def assert_signed_by(send: Send, origin: FakeServer, destination: str) -> None:
    """`send` is the origin's own request to `destination`: its X-Matrix
    signature is made with the origin's key."""
    scheme, _, params = send.authorization.partition(" ")
    assert scheme == "X-Matrix", send.authorization
    auth = dict(re.findall(r'(\w+)="([^"]*)"', params))
    assert auth.keys() == {"origin", "destination", "key", "sig"}, auth
    assert (auth["origin"], auth["destination"], auth["key"]) == (
        origin.server_name,
        destination,
        KEY_ID,
    )
    signed = {
        "method": "PUT",
        "uri": send.path,
        "origin": origin.server_name,
        "destination": destination,
        "content": json.loads(send.body),
        "signatures": {origin.server_name: {KEY_ID: auth["sig"]}},
    }
    verify_signed_json(signed, origin.server_name, get_verify_key(origin.signing_key))


def test_background_tasks_worker_pushes_deposits_of_federation_workers(
    net: Deployment, fake_servers: FakeServerFactory
) -> None:
    """A proven deposit on each federation worker for a plain destination that
    answers: the background-tasks worker, the one process that pushes, finds them
    by its scan (no other process can wake it) and replays the origin's `/send`,
    oldest first; each entry is then deleted."""
    origin = fake_servers.create()
    pusher = net.w.with_duty(BACKGROUND_TASKS)

    def delivered() -> int:
        response = net.admin(pusher, "GET", "status")
        assert response.status_code == 200, response.text
        push: dict[str, int] = response.json()["push"]
        return push["delivered"]

    before = delivered()
    with PlainDestination(fake_servers.cert) as destination:
        name = destination.server_name
        transactions, deposited_at = [], []
        for seq, reader in enumerate(("federation1", "federation2")):
            txn_id = f"pushed-{seq}"
            t: dict[str, Any] = {
                "origin": origin.server_name,
                "origin_server_ts": int(time.time() * 1000),
                "destination": name,
                "transaction_id": txn_id,
                "pdus": [],
                "edus": [{"edu_type": "org.example.seq", "content": {"seq": seq}}],
            }
            body = {**t, ORIGIN_AUTH: origin.origin_proof(t)}
            path = send_relay_path(txn_id, name)
            response = origin.request("PUT", net.w.workers[reader], path, content=body)
            assert response.status_code == 200, response.text
            transactions.append(t)
            deposited_at.append(time.monotonic())

        wait_until(
            lambda: len(destination.sends) >= len(transactions),
            30,
            interval=0.05,
            message="the deposits pushed to the destination",
        )
        wait_until(
            lambda: net.queued(net.w, name) == 0, 30, message="the entries deleted"
        )
        # each pushed once, in order, as the origin signed it
        assert [json.loads(s.body) for s in destination.sends] == transactions
        for send in destination.sends:
            assert_signed_by(send, origin, name)
    latencies = [
        send.at - at for send, at in zip(destination.sends, deposited_at, strict=True)
    ]
    print(
        "\npushed by the background-tasks worker "
        + ", ".join(f"{seconds:.2f} s" for seconds in latencies)
        + f" after each deposit (scan every {SCAN_INTERVAL_MS} ms)"
    )
    # A scan, then a probe and a push on loopback.
    limit = (SCAN_INTERVAL_MS + PROBE_TIMEOUT_MS) / 1000
    assert max(latencies) < limit, latencies
    assert delivered() == before + len(transactions)
    # No other process pushes (the federation workers serve no admin API).
    for process in (net.w, net.w.with_duty(FEDERATION_SENDER)):
        assert net.admin(process, "GET", "status").json()["push"] is None
    for instance in net.w.processes:
        log = instance.log_path.read_text(errors="replace")
        assert ("Relay push enabled" in log) == (instance is pusher), instance


def test_send_role_on_the_federation_sender_worker(net: Deployment) -> None:
    """Direct delivery, then the fallback to b's relay once b is down, by the
    federation sender worker, with relays set through the admin API on main."""
    sender = net.w.with_duty(FEDERATION_SENDER)
    hello = net.send("hello, all up")
    wait_until(lambda: net.bob_has(hello), 30, message="direct delivery to b")

    net.b.stop()
    # The worker reads relays set on another process within MAPPING_CACHE_MS.
    wait_until(
        lambda: time.monotonic() > net.relays_set_at + MAPPING_CACHE_MS / 1000 + 0.5,
        MAPPING_CACHE_MS / 1000 + 1,
        message="the relay mapping cache expired",
    )
    before = net.queued(net.p, net.b.server_name)
    started = time.monotonic()
    net.send("b is down")
    wait_until(
        lambda: net.queued(net.p, net.b.server_name) > before,
        15,
        interval=0.05,
        message="the message deposited on p",
    )
    print(f"\ndeposited on b's relay {time.monotonic() - started:.2f} s after sending")

    def send_status() -> dict[str, Any]:
        response = net.admin(sender, "GET", "status")
        assert response.status_code == 200, response.text
        status: dict[str, Any] = response.json()["send"]
        return status

    assert send_status()["fallbacks"] >= 1
    # The deposit may come first (after 1 s without an answer), the failed direct
    # attempts that make b down just after it.
    wait_until(
        lambda: send_status()["destinations"][net.b.server_name]["state"] == "down",
        10,
        message="b down on the federation sender",
    )
    # The main process does not send federation: no send role there.
    assert net.admin(net.w, "GET", "status").json()["send"] is None


def test_collector_on_the_background_tasks_worker(
    net: Deployment, fake_servers: FakeServerFactory
) -> None:
    """Only the background-tasks worker collects; POST collect elsewhere answers
    409 naming it."""
    origin = fake_servers.create()
    for seq in range(3):
        assert deposit(origin, net.p, net.w.server_name, seq) == 200
    assert net.queued(net.p, net.w.server_name) == 3

    response = net.admin(net.w, "POST", "collect", {})
    assert response.status_code == 409, response.text
    collector = net.w.with_duty(BACKGROUND_TASKS)
    assert f"'{collector.name}'" in response.json()["error"]
    assert net.queued(net.p, net.w.server_name) == 3

    response = net.admin(collector, "POST", "collect", {})
    assert response.status_code == 200, response.text
    assert response.json()["processed"] == 3
    assert net.queued(net.p, net.w.server_name) == 0
    receive = net.admin(collector, "GET", "status").json()["receive"]
    assert receive["processed"] == 3


def test_federation_workers_advertise_our_relays(
    net: Deployment, fake_servers: FakeServerFactory
) -> None:
    """Relay discovery's query is answered by the generic workers too, with w's
    relays signed with w's key (docs/discovery.rst)."""
    asker = fake_servers.create()
    keys = net.w.client("GET", "/_matrix/key/v2/server").json()["verify_keys"]
    for name in ("federation1", "federation2"):
        response = asker.request(
            "GET", net.w.workers[name], f"{FEDERATION_PREFIX}/query/{RELAYS_QUERY_TYPE}"
        )
        assert response.status_code == 200, response.text
        advertisement = response.json()
        assert advertisement["server_name"] == net.w.server_name
        assert advertisement["relays"] == [net.p.server_name]
        for key_id, key in keys.items():
            verify_key = decode_verify_key_bytes(key_id, decode_base64(key["key"]))
            verify_signed_json(advertisement, net.w.server_name, verify_key)


def test_no_process_logged_an_error(net: Deployment) -> None:
    """Nothing above went wrong in any process of w (runs last)."""
    for process in net.w.processes:
        problems = log_problems(process)
        assert not problems, f"{process}:\n" + "\n".join(problems[:5])
