"""Figure 3: relayed versus direct delivery, as the recipient B sees it.

The demo's three homeservers (`synapse_relay.demo.Scenario`, SQLite). bob@B joins
alice@A's room, B goes offline and alice sends K messages one at a time, which A
deposits on R. Those K messages' transactions, exactly as A built them, are then
taken out of R's database, and B's database is saved, so that the same B can
ingest the same transactions twice:

- relayed: the transactions are deposited on R again (signed as A, in the same
  order) and B collects them (`POST /_synapse/relay/v1/collect`, which answers
  once every transaction has been processed: its events persisted or rejected);
- direct: B's database is restored, and the transactions are sent to B's
  `PUT /_matrix/federation/v1/send/{txnId}` signed as A, one at a time as
  Synapse's federation sender does, each as soon as B's inbound staging area has
  room for it (see STAGING_WINDOW), until that area is empty: B's processing
  overlaps with receiving the next transactions, as in direct delivery.

A is stopped during both, as it would be when its mail is collected; the
benchmark signs as A with A's own key (A runs with a `FakeServer`'s signing key).
Afterwards both runs are checked: every message is in B's room, none rejected.

Also measured: the pure collect cost, the same K transactions deposited on R for
a fake server's mailbox and fetched back by it (with acknowledgements) without any
processing, with relay_txn and with batch collect (B's collector uses the latter,
fetching ahead).
"""

import functools
import json
import shutil
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from signedjson.key import write_signing_keys

from bench.collection import collect_mailbox_batch
from bench.common import (
    POLL_INTERVAL,
    AdminSession,
    BenchError,
    Context,
    SignedSession,
    collect_mailbox,
    cpu_seconds,
    sqlite_path,
    sqlite_reader,
    wait_for,
)
from bench.profiling import profiled
from synapse_relay.demo import Scenario
from synapse_relay.fake_federation import FakeServer
from synapse_relay.loopback import Homeserver
from synapse_relay.protocol import send_relay_path
from synapse_relay.store import stored_txn_json

TEXT = "delivery benchmark message {number}"
# The direct sender keeps at most this many PDUs waiting in B's inbound staging
# area. Synapse prunes a room's staging area down to its forward extremities when
# it holds 100 events or more (`prune_staged_events_in_room`), then fetches the
# pruned events from the origin with get_missing_events: with A offline they
# would be rejected. So B is kept busy (the next PDUs are always waiting) without
# ever reaching that limit.
STAGING_WINDOW = 50
INGEST_TIMEOUT = 3600
COLLECT_ADMIN = "/_synapse/relay/v1/collect"


def _admin(homeserver: Homeserver, localpart: str) -> AdminSession:
    return AdminSession(homeserver, homeserver.register_user(localpart, admin=True))


def send_messages(scenario: Scenario, count: int) -> None:
    """alice sends `count` messages, each once the previous one is on R, so that
    each is a transaction of its own (A batches the messages that queue up while
    a transaction is in flight)."""
    alice = AdminSession(scenario.a, scenario.alice.token)
    path = f"/_matrix/client/v3/rooms/{quote(scenario.room_id)}/send/m.room.message/"
    try:
        with sqlite_reader(scenario.r) as db:

            def entries() -> int:
                row = db.execute(
                    "SELECT count(*) FROM synapse_relay_entries WHERE destination = ?",
                    (scenario.b.server_name,),
                ).fetchone()
                return int(row[0])

            def deposited_since(before: int) -> bool:
                return entries() > before

            for number in range(count):
                before = entries()
                alice.call(
                    "PUT",
                    f"{path}bench{number}",
                    {"msgtype": "m.text", "body": TEXT.format(number=number)},
                )
                wait_for(
                    functools.partial(deposited_since, before),
                    60,
                    f"message {number} to be deposited on R",
                    interval=POLL_INTERVAL,
                )
    finally:
        alice.close()


def _benchmark_messages(transaction: dict[str, Any]) -> int:
    prefix = TEXT.split("{", 1)[0]
    return sum(
        1
        for pdu in transaction.get("pdus", [])
        if pdu.get("type") == "m.room.message"
        and str(pdu.get("content", {}).get("body", "")).startswith(prefix)
    )


def deposited_messages(relay: Homeserver, destination: str) -> int:
    with sqlite_reader(relay) as db:
        rows = db.execute(
            "SELECT txn_json, txn_compressed FROM synapse_relay_entries"
            " WHERE destination = ?",
            (destination,),
        ).fetchall()
    return sum(_benchmark_messages(json.loads(stored_txn_json(*row))) for row in rows)


def background_updates_left(homeserver: Homeserver) -> int:
    with sqlite_reader(homeserver) as db:
        row = db.execute("SELECT count(*) FROM background_updates").fetchone()
    return int(row[0])


def take_entries(relay: Homeserver, destination: str) -> list[dict[str, Any]]:
    """Remove every entry for `destination` from a stopped relay's database, with
    its queue totals; the transactions, in entry order."""
    connection = sqlite3.connect(sqlite_path(relay))
    try:
        with connection:
            rows = connection.execute(
                "SELECT txn_json, txn_compressed, size FROM synapse_relay_entries"
                " WHERE destination = ? ORDER BY entry_id",
                (destination,),
            ).fetchall()
            connection.execute(
                "DELETE FROM synapse_relay_entries WHERE destination = ?",
                (destination,),
            )
            connection.execute(
                "UPDATE synapse_relay_queues SET transactions = transactions - ?,"
                " bytes = bytes - ? WHERE destination = ?",
                (len(rows), sum(size for _, _, size in rows), destination),
            )
    finally:
        connection.close()
    return [json.loads(stored_txn_json(text, packed)) for text, packed, _ in rows]


def _database_files(homeserver: Homeserver) -> list[Path]:
    path = sqlite_path(homeserver)
    return [path.with_name(path.name + suffix) for suffix in ("", "-wal", "-shm")]


def save_database(homeserver: Homeserver, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for path in _database_files(homeserver):
        if path.exists():
            shutil.copy2(path, directory / path.name)


def restore_database(homeserver: Homeserver, directory: Path) -> None:
    for path in _database_files(homeserver):
        path.unlink(missing_ok=True)
        saved = directory / path.name
        if saved.exists():
            shutil.copy2(saved, path)


def settle_collector(b_admin: AdminSession) -> None:
    """Wait until B's start-up collection (an empty mailbox) is over, so that the
    measured collection is the only one."""
    wait_for(
        lambda: (
            b_admin.call("GET", "/_synapse/relay/v1/status").get("receive") or {}
        ).get("collections", 0),
        60,
        "B's start-up collection",
    )
    b_admin.call("POST", COLLECT_ADMIN, {})


def deposit_all(
    session: SignedSession, transactions: list[dict[str, Any]], destination: str
) -> float:
    """Deposit the transactions in order for `destination`; seconds it took."""
    started = time.monotonic()
    for transaction in transactions:
        body = dict(transaction, destination=destination)
        path = send_relay_path(transaction["transaction_id"], destination)
        response = session.request("PUT", path, body)
        if response.status_code != 200:
            raise BenchError(f"deposit answered {response.status_code}")
    return time.monotonic() - started


def messages_in_room(homeserver: Homeserver, room_id: str, sender: str) -> int:
    """alice's benchmark messages in B's room that were not rejected."""
    with sqlite_reader(homeserver) as db:
        row = db.execute(
            "SELECT count(*) FROM events AS e WHERE e.room_id = ?"
            " AND e.type = 'm.room.message' AND e.sender = ?"
            " AND NOT EXISTS (SELECT 1 FROM rejections AS r"
            " WHERE r.event_id = e.event_id)",
            (room_id, sender),
        ).fetchone()
    return int(row[0])


def ingest_relayed(
    ctx: Context,
    scenario: Scenario,
    signer: FakeServer,
    transactions: list[dict[str, Any]],
) -> dict[str, Any]:
    b, r = scenario.b, scenario.r
    b.start()
    b_admin = _admin(b, "bench_admin_relayed")
    depositor = SignedSession(signer, r, origin=scenario.a.server_name)
    try:
        settle_collector(b_admin)
        deposit_seconds = deposit_all(depositor, transactions, b.server_name)
        b_cpu, r_cpu = cpu_seconds(b.pid), cpu_seconds(r.pid)
        started = time.monotonic()
        with profiled(
            ctx.options.profile_dir, b.pid, "delivery-relayed-B", ctx.log, wall=True
        ):
            result = b_admin.call("POST", COLLECT_ADMIN, {}, timeout=INGEST_TIMEOUT)
        seconds = time.monotonic() - started
        b_cpu, r_cpu = cpu_seconds(b.pid) - b_cpu, cpu_seconds(r.pid) - r_cpu
    finally:
        depositor.close()
        b_admin.close()
    if result.get("processed") != len(transactions) or result.get("rejected"):
        raise BenchError(f"B's collection did not process everything: {result}")
    return {
        "seconds": seconds,
        "b_cpu_seconds": b_cpu,
        "r_cpu_seconds": r_cpu,
        "deposit_seconds": deposit_seconds,
        "collect_result": result,
    }


def _fits(staged: Callable[[], int], pdus: int) -> bool:
    return staged() + pdus <= STAGING_WINDOW


def ingest_direct(
    ctx: Context,
    scenario: Scenario,
    signer: FakeServer,
    transactions: list[dict[str, Any]],
) -> dict[str, Any]:
    a, b = scenario.a, scenario.b
    b.start()
    b_admin = _admin(b, "bench_admin_direct")
    sender = SignedSession(signer, b, origin=a.server_name)
    try:
        settle_collector(b_admin)
        with sqlite_reader(b) as db:

            def staged() -> int:
                row = db.execute(
                    "SELECT count(*) FROM federation_inbound_events_staging"
                    " WHERE origin = ?",
                    (a.server_name,),
                ).fetchone()
                return int(row[0])

            b_cpu = cpu_seconds(b.pid)
            started = time.monotonic()
            with profiled(
                ctx.options.profile_dir, b.pid, "delivery-direct-B", ctx.log, wall=True
            ):
                for transaction in transactions:
                    # Stay below Synapse's staging limit (see STAGING_WINDOW).
                    pdus = len(transaction["pdus"])
                    if staged() + pdus > STAGING_WINDOW:
                        wait_for(
                            functools.partial(_fits, staged, pdus),
                            INGEST_TIMEOUT,
                            "room in B's staging area",
                            interval=POLL_INTERVAL,
                        )
                    body = {
                        key: transaction[key]
                        for key in ("origin", "origin_server_ts", "pdus", "edus")
                    }
                    path = "/_matrix/federation/v1/send/" + quote(
                        transaction["transaction_id"], safe=""
                    )
                    response = sender.request("PUT", path, body)
                    if response.status_code != 200:
                        raise BenchError(f"/send answered {response.status_code}")
                    errors = {
                        event_id: answer
                        for event_id, answer in response.json().get("pdus", {}).items()
                        if answer
                    }
                    if errors:
                        raise BenchError(f"/send refused PDUs: {errors}")
                sent = time.monotonic() - started
                wait_for(
                    lambda: staged() == 0,
                    INGEST_TIMEOUT,
                    "B to process the PDUs sent directly",
                    interval=POLL_INTERVAL,
                )
            seconds = time.monotonic() - started
            b_cpu = cpu_seconds(b.pid) - b_cpu
    finally:
        sender.close()
        b_admin.close()
    return {"seconds": seconds, "send_seconds": sent, "b_cpu_seconds": b_cpu}


def collect_cost(
    relay: Homeserver,
    depositor: SignedSession,
    owner: FakeServer,
    transactions: list[dict[str, Any]],
) -> dict[str, Any]:
    """Deposit the transactions for `owner`'s mailbox, then let it fetch them
    all, acknowledging each, as a collector does, without processing anything:
    once with relay_txn, then (deposited again) with batch collect."""
    result: dict[str, Any] = {}

    def batch(
        owner: FakeServer, relay: Homeserver, limit: int
    ) -> tuple[int, float, float]:
        session = SignedSession(owner, relay)
        return collect_mailbox_batch(session, owner.server_name, relay, limit)

    for wire, collect in (("", collect_mailbox), ("batch_", batch)):
        deposit_seconds = deposit_all(depositor, transactions, owner.server_name)
        fetched, seconds, relay_cpu = collect(owner, relay, len(transactions))
        if fetched != len(transactions):
            raise BenchError(
                f"collected {fetched} of {len(transactions)} transactions"
                f" ({wire or 'relay_txn'})"
            )
        result.update(
            {
                f"{wire}transactions": fetched,
                f"{wire}seconds": seconds,
                f"{wire}per_second": fetched / seconds,
                f"{wire}r_cpu_ms_per_transaction": 1000 * relay_cpu / max(fetched, 1),
            }
        )
        result.setdefault(
            "deposits_per_second_sequential", len(transactions) / deposit_seconds
        )
    return result


def run(ctx: Context) -> dict[str, Any]:
    count = ctx.options.messages
    directory = ctx.directory("delivery")
    scenario = Scenario(directory)
    a, r, b = scenario.homeservers
    # A signs with a FakeServer's key, so the benchmark can sign as A.
    signer = FakeServer(ctx.cert)
    with a.signing_key_path.open("w") as f:
        write_signing_keys(f, [signer.signing_key])
    # push off: R must not deliver to B itself, what is measured is B collecting
    r.module_config = {"relay": {"enabled": True, "destinations": ["*"], "push": False}}
    b.module_config = {"receive": {"relays": [r.server_name], "poll_interval": "1h"}}
    # B's database is saved once B is offline. A new Synapse works through dozens
    # of background updates (indexes, table rewrites) for its first minute, sleeping
    # a second between batches; left pending in the snapshot, they would run in
    # both measured runs, each time at another moment. So B does them first,
    # without the sleeps, and the measured runs use Synapse's defaults.
    b.extra_config = {"background_updates": {"sleep_enabled": False}}
    mailbox: FakeServer | None = None
    try:
        ctx.log("figure 3: starting A, R, B; bob@B joins alice@A's room")
        scenario.start_and_join()
        wait_for(
            lambda: background_updates_left(b) == 0,
            300,
            "B's background updates to be done",
            interval=POLL_INTERVAL,
        )
        b.extra_config = None

        ctx.log(f"figure 3: B offline, alice sends {count} messages, deposited on R")
        b.stop()
        started = time.monotonic()
        send_messages(scenario, count)
        wait_for(
            lambda: deposited_messages(r, b.server_name) >= count,
            600,
            f"{count} messages to be deposited on R",
            interval=0.2,
        )
        generation = time.monotonic() - started
        a.stop()
        r.stop()
        transactions = take_entries(r, b.server_name)
        messages = sum(_benchmark_messages(t) for t in transactions)
        if messages != count:
            raise BenchError(f"R held {messages} messages, expected {count}")
        r.start()
        snapshot = directory / "B-before"
        save_database(b, snapshot)

        ctx.log(f"figure 3: B collects {len(transactions)} transactions from R")
        relayed = ingest_relayed(ctx, scenario, signer, transactions)
        relayed["messages_in_room"] = messages_in_room(
            b, scenario.room_id, scenario.alice.user_id
        )
        b.stop()
        restore_database(b, snapshot)

        ctx.log(f"figure 3: the same {len(transactions)} transactions sent to B")
        direct = ingest_direct(ctx, scenario, signer, transactions)
        direct["messages_in_room"] = messages_in_room(
            b, scenario.room_id, scenario.alice.user_id
        )
        b.stop()
        for name, run_result in (("relayed", relayed), ("direct", direct)):
            if run_result["messages_in_room"] != count:
                raise BenchError(
                    f"{name}: {run_result['messages_in_room']} of {count} messages"
                    " are in B's room"
                )

        ctx.log("figure 3: pure collect cost from R")
        mailbox = FakeServer(ctx.cert).start()
        depositor = SignedSession(signer, r, origin=a.server_name)
        try:
            collect = collect_cost(r, depositor, mailbox, transactions)
        finally:
            depositor.close()
        return {
            "messages": count,
            "transactions": len(transactions),
            "transaction_bytes_mean": sum(len(json.dumps(t)) for t in transactions)
            / len(transactions),
            "generation_seconds": generation,
            "relayed": relayed,
            "direct": direct,
            "ratio": relayed["seconds"] / direct["seconds"],
            "collect": collect,
        }
    finally:
        if mailbox is not None:
            mailbox.stop()
        scenario.stop_all()
