"""The store's SQL, run through Synapse's `LoggingTransaction` on a real SQLite
database and on the test PostgreSQL server, at the isolation the store uses."""

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import pytest
from synapse.storage.database import LoggingTransaction
from synapse.storage.engines import BaseDatabaseEngine, create_engine

from synapse_relay import compression
from synapse_relay._synapse import is_postgres
from synapse_relay._synapse.database import READ_COMMITTED
from synapse_relay.store import (
    Collected,
    Deposit,
    Entry,
    NewEntry,
    Queue,
    Quota,
    QuotaExceeded,
    entries,
    keys,
    relays,
    schema,
)
from tests.harness.postgres import Backend, PostgresCluster


class Database:
    """A database of one backend; `transaction()` opens a connection and hands
    out what `run_db_interaction` hands a function, at READ COMMITTED."""

    def __init__(
        self, engine: BaseDatabaseEngine[Any, Any], connect: Callable[[], Any]
    ) -> None:
        self.engine = engine
        self._connect = connect
        self._connections: list[Any] = []

    def connection(self) -> Any:
        connection = self._connect()
        self.engine.attempt_to_set_isolation_level(connection, READ_COMMITTED)
        self._connections.append(connection)
        return connection

    def txn(self, connection: Any) -> LoggingTransaction:
        return LoggingTransaction(
            txn=connection.cursor(),
            name="test",
            server_name="test",
            database_engine=self.engine,
        )

    def run(self, connection: Any, func: Callable[..., Any], *args: Any) -> Any:
        """`func(txn, *args)` in its own committed transaction."""
        try:
            result = func(self.txn(connection), *args)
        except BaseException:
            connection.rollback()
            raise
        connection.commit()
        return result

    def close(self) -> None:
        for connection in self._connections:
            connection.close()


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Database]:
    if request.param == "postgres":
        cluster: PostgresCluster = request.getfixturevalue("pg_cluster")
        config = Backend.postgres(cluster)()
        assert config is not None
        args = config["args"]
        db = Database(
            create_engine(config),
            lambda: psycopg2.connect(
                host=args["host"],
                port=args["port"],
                user=args["user"],
                dbname=args["database"],
            ),
        )
    else:
        path = str(tmp_path / "relay.db")
        db = Database(
            create_engine({"name": "sqlite3", "args": {"database": path}}),
            lambda: sqlite3.connect(path, timeout=60, check_same_thread=False),
        )
    yield db
    db.close()


@pytest.fixture
def txn(database: Database) -> LoggingTransaction:
    """One long transaction on a schema at the current version."""
    txn = database.txn(database.connection())
    schema._create_or_migrate_schema_txn(txn)
    return txn


Txn = LoggingTransaction


def deposit(
    txn: Txn,
    txn_id: str = "t1",
    origin: str = "a",
    destination: str = "b",
    body: str = "{}",
    now: int = 1000,
    max_transactions: int = 10,
    max_bytes: int = 1000,
    origin_auth: str | None = None,
) -> Deposit:
    (outcome,) = entries._deposit_batch_txn(
        txn,
        [
            (
                NewEntry(origin, txn_id, destination, body, now, origin_auth),
                Quota(max_transactions, max_bytes),
            )
        ],
    )
    if isinstance(outcome, QuotaExceeded):
        raise outcome
    return outcome


def collect(txn: Txn, destination: str = "b", ack: int = 0) -> Collected:
    return entries._acknowledge_and_get_oldest_txn(txn, destination, ack)


def test_schema_is_versioned_and_idempotent(txn: Txn) -> None:
    schema._create_or_migrate_schema_txn(txn)
    txn.execute("SELECT version FROM synapse_relay_schema_version")
    assert txn.fetchall() == [(schema.SCHEMA_VERSION,)]


def test_newer_schema_is_refused(txn: Txn) -> None:
    txn.execute("UPDATE synapse_relay_schema_version SET version = 99")
    with pytest.raises(schema.SchemaTooNew):
        schema._create_or_migrate_schema_txn(txn)


def test_deposit_is_idempotent_per_origin_txn_destination(txn: Txn) -> None:
    first = deposit(txn)
    assert not first.duplicate
    assert deposit(txn, body='{"other": 1}') == Deposit(first.entry_id, True)
    assert not deposit(txn, origin="c").duplicate
    assert not deposit(txn, destination="c").duplicate
    assert not deposit(txn, txn_id="t2").duplicate
    assert entries._queues_txn(txn) == [
        Queue("b", 3, 6, 1000, 0),
        Queue("c", 1, 2, 1000, 0),
    ]


def test_fifo_and_ack_deletes_exactly_that_entry(txn: Txn) -> None:
    ids = [deposit(txn, txn_id=f"t{i}", body=f'"{i}"').entry_id for i in range(3)]
    other = deposit(txn, txn_id="x", destination="c").entry_id
    assert collect(txn) == Collected(False, Entry(ids[0], '"0"'))
    # Acknowledging another destination's entry deletes nothing.
    assert collect(txn, ack=other) == Collected(False, Entry(ids[0], '"0"'))
    assert collect(txn, destination="c").entry == Entry(other, "{}")
    # Acknowledging a later entry deletes only it, never a range.
    assert collect(txn, ack=ids[1]) == Collected(True, Entry(ids[0], '"0"'))
    assert collect(txn, ack=ids[0]) == Collected(True, Entry(ids[2], '"2"'))
    assert collect(txn, ack=ids[0]) == Collected(False, Entry(ids[2], '"2"'))
    assert collect(txn, ack=ids[2]) == Collected(True, None)
    assert entries._queues_txn(txn) == [Queue("c", 1, 2, 1000, 0)]


def test_entry_ids_are_never_reused(txn: Txn) -> None:
    first = deposit(txn).entry_id
    collect(txn, ack=first)
    assert deposit(txn, txn_id="t2").entry_id > first


def test_quota_of_transactions(txn: Txn) -> None:
    deposit(txn, txn_id="1", max_transactions=2)
    deposit(txn, txn_id="2", max_transactions=2)
    with pytest.raises(QuotaExceeded, match="max_transactions_per_destination"):
        deposit(txn, txn_id="3", max_transactions=2)
    # an already stored transaction is still answered as stored
    assert deposit(txn, txn_id="2", max_transactions=2).duplicate
    # other destinations have their own quota
    deposit(txn, txn_id="3", destination="c", max_transactions=2)


def test_quota_of_bytes(txn: Txn) -> None:
    deposit(txn, txn_id="1", body="x" * 60, max_bytes=100)
    with pytest.raises(QuotaExceeded, match="max_bytes_per_destination"):
        deposit(txn, txn_id="2", body="y" * 41, max_bytes=100)
    deposit(txn, txn_id="3", body="z" * 40, max_bytes=100)
    assert entries._queues_txn(txn) == [Queue("b", 2, 100, 1000, 0)]


def test_bytes_are_utf8_bytes(txn: Txn) -> None:
    deposit(txn, body='"é"')
    assert entries._queues_txn(txn)[0].bytes == 4


def test_purge_removes_old_entries_and_updates_totals(txn: Txn) -> None:
    deposit(txn, txn_id="old", now=100)
    deposit(txn, txn_id="old", destination="c", now=150)
    kept = deposit(txn, txn_id="new", now=300).entry_id
    assert entries._purge_batch_txn(txn, 200, 10) == 2
    assert entries._queues_txn(txn) == [Queue("b", 1, 2, 300, 0)]
    assert collect(txn).entry == Entry(kept, "{}")


def test_purge_works_in_batches(txn: Txn) -> None:
    for i in range(5):
        deposit(txn, txn_id=str(i), now=i)
    assert entries._purge_batch_txn(txn, 100, 2) == 2
    assert entries._purge_batch_txn(txn, 100, 2) == 2
    assert entries._purge_batch_txn(txn, 100, 2) == 1
    assert entries._queues_txn(txn) == []


def test_origin_proof_is_kept_beside_the_entry_and_counted(txn: Txn) -> None:
    proof = '{"key":"ed25519:k","sig":"s"}'
    proven = deposit(txn, txn_id="p", origin_auth=proof).entry_id
    unproven = deposit(txn, txn_id="u").entry_id
    assert entries._queues_txn(txn) == [Queue("b", 2, 4, 1000, 1)]
    assert collect(txn) == Collected(False, Entry(proven, "{}", proof))
    assert collect(txn, ack=proven) == Collected(True, Entry(unproven, "{}", None))


def test_version_2_tables_gain_the_proof_column(txn: Txn) -> None:
    txn.execute("DROP INDEX synapse_relay_entries_proven")
    for column in ("origin_auth", "txn_compressed"):
        txn.execute(f"ALTER TABLE synapse_relay_entries DROP COLUMN {column}")
    txn.execute("DROP TABLE synapse_relay_key_snapshots")
    txn.execute("DROP TABLE synapse_relay_key_stock")
    for table in schema._schema_discovery(False):  # (version 6 is newer too)
        txn.execute(f"DROP TABLE {table.split()[2]}")
    txn.execute("UPDATE synapse_relay_schema_version SET version = 2")
    txn.execute(
        "INSERT INTO synapse_relay_entries"
        " (destination, origin, txn_id, received_ts, size, txn_json)"
        " VALUES ('b', 'a', 't', 1000, 2, '{}')"
    )
    schema._create_or_migrate_schema_txn(txn)
    assert collect(txn).entry == Entry(1, "{}", None)


def deposit_proven(txn: Txn, txn_id: str, destination: str = "b") -> int:
    proof = '{"key":"ed25519:k","sig":"s"}'
    return deposit(txn, txn_id, destination=destination, origin_auth=proof).entry_id


def test_pusher_reads_proven_entries_in_order_past_unproven_ones(txn: Txn) -> None:
    deposit(txn, txn_id="u1")
    first = deposit_proven(txn, "p1")
    deposit(txn, txn_id="u2", destination="c")
    second = deposit_proven(txn, "p2")
    deposit_proven(txn, "p3", destination="d")
    assert entries._destinations_with_proven_entries_txn(txn) == ["b", "d"]
    oldest = entries._oldest_entry_txn(txn, "b", schema.PROVEN)
    assert oldest is not None and oldest.entry_id == first
    # a pushed entry is deleted as an acknowledgement deletes it: totals follow
    assert entries._acknowledge_txn(txn, "b", first)
    assert not entries._acknowledge_txn(txn, "b", first)
    assert not entries._acknowledge_txn(txn, "c", second)  # not c's
    oldest = entries._oldest_entry_txn(txn, "b", schema.PROVEN)
    assert oldest is not None and oldest.entry_id == second
    assert entries._acknowledge_txn(txn, "b", second)
    assert entries._oldest_entry_txn(txn, "b", schema.PROVEN) is None
    assert entries._destinations_with_proven_entries_txn(txn) == ["d"]
    assert entries._queues_txn(txn)[0] == Queue("b", 1, 2, 1000, 0)


def test_proven_entries_are_read_through_their_index(txn: Txn) -> None:
    if is_postgres(txn):
        pytest.skip("SQLite's query plan")
    txn.execute(
        "EXPLAIN QUERY PLAN SELECT entry_id FROM synapse_relay_entries"
        f" WHERE destination = 'b' {schema.PROVEN} ORDER BY entry_id LIMIT 1"
    )
    assert "synapse_relay_entries_proven" in str(txn.fetchall())


# --- group commit: one database transaction for many deposits ----------------------


def test_a_batch_answers_each_deposit_on_its_own(txn: Txn) -> None:
    quota = Quota(max_transactions=2, max_bytes=1000)
    big = Quota(max_transactions=10, max_bytes=5)
    outcomes = entries._deposit_batch_txn(
        txn,
        [
            (NewEntry("a", "1", "b", '"1"', 10), quota),
            (NewEntry("a", "1", "b", '"1"', 10), quota),  # repeated in the batch
            (NewEntry("a", "2", "c", '"2"', 10), quota),
            (NewEntry("a", "3", "b", '"3"', 10), quota),
            (NewEntry("a", "4", "b", '"4"', 10), quota),  # b is full
            (NewEntry("a", "5", "c", '"too big"', 10), big),  # c's bytes
            (NewEntry("a", "3", "b", '"3"', 10), quota),  # stored, b full: still 200
        ],
    )
    first, again, other, third, full, too_big, stored = outcomes
    assert isinstance(first, Deposit) and not first.duplicate
    assert again == Deposit(first.entry_id, True)
    assert isinstance(other, Deposit) and not other.duplicate
    assert isinstance(third, Deposit) and not third.duplicate
    assert first.entry_id < other.entry_id < third.entry_id  # in batch order
    assert isinstance(full, QuotaExceeded)
    assert "max_transactions_per_destination" in str(full)
    assert isinstance(too_big, QuotaExceeded)
    assert "max_bytes_per_destination" in str(too_big)
    assert stored == Deposit(third.entry_id, True)
    assert entries._queues_txn(txn) == [
        Queue("b", 2, 6, 10, 0),
        Queue("c", 1, 3, 10, 0),
    ]
    assert collect(txn).entry == Entry(first.entry_id, '"1"')
    assert collect(txn, ack=first.entry_id).entry == Entry(third.entry_id, '"3"')


# --- compact storage ----------------------------------------------------------------

UNICODE_JSON = '{"body":"é 😀 \\u0000 ' + "long text " * 300 + '","n":[1,2,3]}'


def test_transactions_are_stored_compressed_and_read_back_identically(
    txn: Txn,
) -> None:
    entry_id = deposit(txn, body=UNICODE_JSON, max_bytes=10**6).entry_id
    txn.execute(
        "SELECT size, txn_json, txn_compressed FROM synapse_relay_entries"
        " WHERE entry_id = ?",
        (entry_id,),
    )
    size, txn_json, stored = txn.fetchone()  # type: ignore[misc]
    assert size == len(UNICODE_JSON.encode("utf-8"))  # quotas count JSON bytes
    assert txn_json == ""
    assert len(stored) < size / 10
    assert collect(txn).entry == Entry(entry_id, UNICODE_JSON)


def test_compression_round_trips_and_refuses_unknown_encodings() -> None:
    for text in ("", "{}", UNICODE_JSON):
        assert compression.decompress(compression.compress(text)) == text
    for stored in (b"", b"\x00abc", b"\x7fabc"):
        with pytest.raises(compression.UnknownEncoding):
            compression.decompress(stored)


def test_migration_from_version_2_keeps_old_rows_readable(database: Database) -> None:
    connection = database.connection()
    postgres = database.engine.__class__.__name__ == "PostgresEngine"

    def schema_v2(txn: Txn) -> None:
        for version in (1, 2):
            for statement in schema._MIGRATIONS[version](postgres):
                txn.execute(statement)
        txn.execute(
            "CREATE TABLE synapse_relay_schema_version (version INTEGER NOT NULL)"
        )
        txn.execute("INSERT INTO synapse_relay_schema_version (version) VALUES (2)")
        # a row as version 2 wrote it, with its totals
        txn.execute(
            "INSERT INTO synapse_relay_entries"
            " (destination, origin, txn_id, received_ts, size, txn_json)"
            " VALUES ('b', 'a', 'old', 5, ?, ?)",
            (len(UNICODE_JSON.encode("utf-8")), UNICODE_JSON),
        )
        txn.execute(
            "INSERT INTO synapse_relay_queues (destination, transactions, bytes)"
            " VALUES ('b', 1, ?)",
            (len(UNICODE_JSON.encode("utf-8")),),
        )

    database.run(connection, schema_v2)
    database.run(connection, schema._create_or_migrate_schema_txn)
    txn = database.txn(connection)
    txn.execute("SELECT version FROM synapse_relay_schema_version")
    assert txn.fetchall() == [(schema.SCHEMA_VERSION,)]
    # the old row is a duplicate for its (origin, txn_id, destination), and comes
    # first; new rows are compressed
    assert deposit(txn, txn_id="old", max_bytes=10**6).duplicate
    new = deposit(txn, txn_id="new", body='"new"', max_bytes=10**6).entry_id
    old = collect(txn).entry
    assert old is not None and old.txn_json == UNICODE_JSON
    assert collect(txn, ack=old.entry_id).entry == Entry(new, '"new"')
    assert entries._queues_txn(txn) == [Queue("b", 1, 5, 1000, 0)]


# --- several processes: concurrent transactions on one destination ------------------


def several_processes(database: Database) -> None:
    """Skip on SQLite (Synapse has one connection to it), else make the schema."""
    if database.engine.__class__.__name__ != "PostgresEngine":
        pytest.skip("Synapse has one connection to an SQLite database")
    database.run(database.connection(), schema._create_or_migrate_schema_txn)


def test_concurrent_deposits_from_two_connections(database: Database) -> None:
    """Two processes (two connections, as two Synapse workers have) deposit the
    same transactions for one destination at once, then again while a third
    collects: no serialization failure, every transaction stored once, the quota
    exact, FIFO."""
    several_processes(database)
    errors: list[BaseException] = []

    def in_thread(func: Callable[..., None], *args: Any) -> threading.Thread:
        def run() -> None:
            try:
                func(database.connection(), *args)
            except BaseException as e:
                errors.append(e)

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    def depositor(connection: Any, txn_ids: list[str], quota: Quota, out: list) -> None:
        for start in range(0, len(txn_ids), 5):  # batches of 5, in order
            batch = [
                (NewEntry("a", txn_id, "b", f'"{txn_id}"', 1), quota)
                for txn_id in txn_ids[start : start + 5]
            ]
            out += database.run(connection, entries._deposit_batch_txn, batch)

    def deposit_twice_at_once(txn_ids: list[str], quota: Quota) -> list[tuple]:
        one: list[Any] = []
        two: list[Any] = []
        threads = [
            in_thread(depositor, txn_ids, quota, one),
            in_thread(depositor, txn_ids, quota, two),
        ]
        for thread in threads:
            thread.join(timeout=120)
        assert errors == []
        return list(zip(one, two, strict=True))

    # The quota is exact: the first 150 are stored once each, the rest refused.
    txn_ids = [f"t{i:04d}" for i in range(200)]
    outcomes = deposit_twice_at_once(txn_ids, Quota(150, 10**9))
    for a, b in outcomes[:150]:
        assert isinstance(a, Deposit) and isinstance(b, Deposit)
        assert a.entry_id == b.entry_id and a.duplicate != b.duplicate
    for a, b in outcomes[150:]:
        assert isinstance(a, QuotaExceeded) and isinstance(b, QuotaExceeded)
    ids = [a.entry_id for a, _ in outcomes[:150]]
    assert ids == sorted(ids)

    # While a collector acknowledges: nothing lost, in order.
    collected: list[str] = []

    def collector(connection: Any, count: int) -> None:
        entry_id = 0
        deadline = time.monotonic() + 120
        while len(collected) < count and time.monotonic() < deadline:
            got = database.run(
                connection, entries._acknowledge_and_get_oldest_txn, "b", entry_id
            )
            entry_id = got.entry.entry_id if got.entry else 0
            if got.entry:
                collected.append(got.entry.txn_json.strip('"'))
        database.run(connection, entries._acknowledge_and_get_oldest_txn, "b", entry_id)

    more = [f"t{i:04d}" for i in range(200, 300)]
    collecting = in_thread(collector, 250)
    deposit_twice_at_once(more, Quota(10**6, 10**9))
    collecting.join(timeout=120)
    assert errors == []
    assert collected == txn_ids[:150] + more
    assert entries._queues_txn(database.txn(database.connection())) == []


def test_the_newest_advertisement_is_kept(txn: Txn) -> None:
    def keep(ts: int, servers: tuple[str, ...], fetched: int) -> bool:
        return relays._keep_advertisement_txn(
            txn, relays.Advertisement("b", servers, ts, ts + 100), "{}", fetched
        )

    assert keep(10, ("r",), 11)
    assert keep(10, ("r",), 12)  # the same one again: fetched_ts moves
    assert not keep(9, ("old",), 13)
    assert relays._discovered_txn(txn, "b") == {
        "b": relays.Discovered(relays.Advertisement("b", ("r",), 10, 110), 12)
    }
    assert keep(20, (), 21)
    assert relays._discovered_txn(txn, None)["b"].advertisement.relays == ()
    assert relays._forget_discovered_txn(txn, "b")
    assert not relays._forget_discovered_txn(txn, "b")
    assert relays._discovered_txn(txn, None) == {}


def test_registrations(txn: Txn) -> None:
    relays._register_txn(txn, "b", 100)
    relays._register_txn(txn, "c", 50)
    relays._register_txn(txn, "b", 200)
    assert relays._registered_txn(txn, None, 60) == {"b": 200}
    assert relays._registered_txn(txn, "c", 0) == {"c": 50}
    assert relays._registered_txn(txn, "c", 60) == {}


def test_a_batch_for_many_destinations_locks_them_all(txn: Txn) -> None:
    destinations = [f"d{i:03d}" for i in range(entries.LOCK_CHUNK * 2 + 5)]
    quota = Quota(max_transactions=1, max_bytes=1000)
    outcomes = entries._deposit_batch_txn(
        txn,
        [(NewEntry("a", "t", d, "{}", 5), quota) for d in destinations]
        + [(NewEntry("a", "u", destinations[-1], "{}", 5), quota)],
    )
    assert all(isinstance(o, Deposit) for o in outcomes[:-1])
    assert isinstance(outcomes[-1], QuotaExceeded)  # its destination's quota
    assert entries._queues_txn(txn) == [Queue(d, 1, 2, 5, 0) for d in destinations]


# --- key mailbox: uploads and claims from several processes -------------------------

ALGORITHM = "signed_curve25519"


def upload_keys(txn: Txn, user: str, key_ids: list[str], quota: keys.KeyQuota) -> int:
    """Upload a snapshot of @user:o, with device D, and these keys of D."""
    user_id = f"@{user}:o"
    return keys._store_key_snapshots_txn(
        txn,
        "o",
        [keys.KeySnapshot(user_id, 1, "{}", frozenset({"D"}))],
        [keys.EscrowedKey(user_id, "D", ALGORITHM, key_id, "{}") for key_id in key_ids],
        quota,
        1,
    )


def test_key_uploads_of_a_server_take_turns_across_processes(
    database: Database,
) -> None:
    """Two processes upload keys of one server at once: the second waits for the
    first to commit, then counts its users too: the quota stays exact."""
    several_processes(database)
    quota = keys.KeyQuota(max_users=1, max_stock_per_device=10)
    first, second, watcher = (database.connection() for _ in range(3))
    watcher.autocommit = True
    upload_keys(database.txn(first), "a", [], quota)  # uncommitted
    outcome: list[object] = []

    def upload() -> None:
        try:
            outcome.append(database.run(second, upload_keys, "b", [], quota))
        except QuotaExceeded as e:
            outcome.append(e)

    thread = threading.Thread(target=upload)
    thread.start()
    # Until the second upload waits for the first's lock (or is done without it).
    deadline = time.monotonic() + 60
    while thread.is_alive():
        txn = database.txn(watcher)
        txn.execute(
            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = ?",
            (second.get_backend_pid(),),
        )
        if txn.fetchone() == ("Lock",):
            break
        assert time.monotonic() < deadline
        thread.join(timeout=0.01)
    first.commit()
    thread.join(timeout=60)
    assert len(outcome) == 1 and isinstance(outcome[0], QuotaExceeded)
    assert keys._key_holdings_txn(database.txn(watcher), "o") == ({"@a:o": 1}, {})


def test_key_claims_from_several_processes_take_each_key_once(
    database: Database,
) -> None:
    """Three processes claim a device's key at once, one of them in a transaction
    begun before another's claim committed (at REPEATABLE READ, a serialization
    failure): each gets its own key, none fails."""
    several_processes(database)
    quota = keys.KeyQuota(max_users=1, max_stock_per_device=10)
    database.run(database.connection(), upload_keys, "a", ["k1", "k2", "k3"], quota)
    one, two, three = (database.connection() for _ in range(3))
    late = database.txn(three)
    stock = {"@a:o": {"D": {ALGORITHM: 3}}}
    assert keys._key_holdings_txn(late, "o") == ({"@a:o": 1}, stock)
    wanted = [("@a:o", "D", ALGORITHM)]
    claim = keys._claim_escrowed_keys_txn
    # one holds k1 (uncommitted); two skips it and takes k2; three skips k1 and
    # does not see k2, deleted since its transaction began: k3
    claimed = [claim(database.txn(one), "o", wanted)]
    claimed.append(database.run(two, claim, "o", wanted))
    claimed.append(claim(late, "o", wanted))
    three.commit()
    one.commit()
    assert [c[wanted[0]][0] for c in claimed] == ["k1", "k2", "k3"]
    assert database.run(two, claim, "o", wanted) == {}
    assert database.run(two, keys._key_holdings_txn, "o") == ({"@a:o": 1}, {})
