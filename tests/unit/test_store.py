"""The queue's SQL, run on a real SQLite database (integration tests run it on
PostgreSQL through Synapse)."""

import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest

from synapse_relay import store
from synapse_relay.store import (
    Collected,
    Deposit,
    Entry,
    NewEntry,
    Queue,
    Quota,
    QuotaExceeded,
)


class Txn:
    """What `run_db_interaction` hands a function, on a plain SQLite cursor."""

    database_engine = None

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._cursor = connection.cursor()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


@pytest.fixture
def txn() -> Iterator[Txn]:
    connection = sqlite3.connect(":memory:")
    txn = Txn(connection)
    store._create_or_migrate_schema_txn(txn)
    yield txn
    connection.close()


def deposit(
    txn: Txn,
    txn_id: str = "t1",
    origin: str = "a",
    destination: str = "b",
    body: str = "{}",
    now: int = 1000,
    max_transactions: int = 10,
    max_bytes: int = 1000,
) -> Deposit:
    return store._deposit_txn(
        txn,
        NewEntry(origin, txn_id, destination, body, now),
        Quota(max_transactions, max_bytes),
    )


def collect(txn: Txn, destination: str = "b", ack: int = 0) -> Collected:
    return store._acknowledge_and_get_oldest_txn(txn, destination, ack)


def test_schema_is_versioned_and_idempotent(txn: Txn) -> None:
    store._create_or_migrate_schema_txn(txn)
    txn.execute("SELECT version FROM synapse_relay_schema_version")
    assert txn.fetchall() == [(store.SCHEMA_VERSION,)]


def test_newer_schema_is_refused(txn: Txn) -> None:
    txn.execute("UPDATE synapse_relay_schema_version SET version = 99")
    with pytest.raises(store.SchemaTooNew):
        store._create_or_migrate_schema_txn(txn)


def test_deposit_is_idempotent_per_origin_txn_destination(txn: Txn) -> None:
    first = deposit(txn)
    assert not first.duplicate
    assert deposit(txn, body='{"other": 1}') == Deposit(first.entry_id, True)
    assert not deposit(txn, origin="c").duplicate
    assert not deposit(txn, destination="c").duplicate
    assert not deposit(txn, txn_id="t2").duplicate
    assert store._queues_txn(txn) == [
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
    assert store._queues_txn(txn) == [Queue("c", 1, 2, 1000, 0)]


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
    assert store._queues_txn(txn) == [Queue("b", 2, 100, 1000, 0)]


def test_bytes_are_utf8_bytes(txn: Txn) -> None:
    deposit(txn, body='"é"')
    assert store._queues_txn(txn)[0].bytes == 4


def test_purge_removes_old_entries_and_updates_totals(txn: Txn) -> None:
    deposit(txn, txn_id="old", now=100)
    deposit(txn, txn_id="old", destination="c", now=150)
    kept = deposit(txn, txn_id="new", now=300).entry_id
    assert store._purge_batch_txn(txn, 200, 10) == 2
    assert store._queues_txn(txn) == [Queue("b", 1, 2, 300, 0)]
    assert collect(txn).entry == Entry(kept, "{}")


def test_purge_works_in_batches(txn: Txn) -> None:
    for i in range(5):
        deposit(txn, txn_id=str(i), now=i)
    assert store._purge_batch_txn(txn, 100, 2) == 2
    assert store._purge_batch_txn(txn, 100, 2) == 2
    assert store._purge_batch_txn(txn, 100, 2) == 1
    assert store._queues_txn(txn) == []


def test_origin_proof_is_kept_beside_the_entry_and_counted(txn: Txn) -> None:
    proof = '{"key":"ed25519:k","sig":"s"}'
    proven = store._deposit_txn(
        txn, NewEntry("a", "p", "b", "{}", 1000, origin_auth=proof), Quota(10, 1000)
    ).entry_id
    unproven = deposit(txn, txn_id="u").entry_id
    assert store._queues_txn(txn) == [Queue("b", 2, 4, 1000, 1)]
    assert collect(txn) == Collected(False, Entry(proven, "{}", proof))
    assert collect(txn, ack=proven) == Collected(True, Entry(unproven, "{}", None))


def test_version_2_tables_gain_the_proof_column(txn: Txn) -> None:
    txn.execute("DROP INDEX synapse_relay_entries_proven")
    txn.execute("ALTER TABLE synapse_relay_entries DROP COLUMN origin_auth")
    txn.execute("DROP TABLE synapse_relay_key_snapshots")
    txn.execute("DROP TABLE synapse_relay_key_stock")
    txn.execute("UPDATE synapse_relay_schema_version SET version = 2")
    txn.execute(
        "INSERT INTO synapse_relay_entries"
        " (destination, origin, txn_id, received_ts, size, txn_json)"
        " VALUES ('b', 'a', 't', 1000, 2, '{}')"
    )
    store._create_or_migrate_schema_txn(txn)
    assert collect(txn).entry == Entry(1, "{}", None)


def deposit_proven(txn: Txn, txn_id: str, destination: str = "b") -> int:
    proof = '{"key":"ed25519:k","sig":"s"}'
    return store._deposit_txn(
        txn,
        NewEntry("a", txn_id, destination, "{}", 1000, origin_auth=proof),
        Quota(10, 1000),
    ).entry_id


def test_pusher_reads_proven_entries_in_order_past_unproven_ones(txn: Txn) -> None:
    deposit(txn, txn_id="u1")
    first = deposit_proven(txn, "p1")
    deposit(txn, txn_id="u2", destination="c")
    second = deposit_proven(txn, "p2")
    deposit_proven(txn, "p3", destination="d")
    assert store._destinations_with_proven_entries_txn(txn) == ["b", "d"]
    oldest = store._oldest_entry_txn(txn, "b", store._PROVEN)
    assert oldest is not None and oldest.entry_id == first
    # a pushed entry is deleted as an acknowledgement deletes it: totals follow
    assert store._acknowledge_txn(txn, "b", first)
    assert not store._acknowledge_txn(txn, "b", first)
    assert not store._acknowledge_txn(txn, "c", second)  # not c's
    oldest = store._oldest_entry_txn(txn, "b", store._PROVEN)
    assert oldest is not None and oldest.entry_id == second
    assert store._acknowledge_txn(txn, "b", second)
    assert store._oldest_entry_txn(txn, "b", store._PROVEN) is None
    assert store._destinations_with_proven_entries_txn(txn) == ["d"]
    assert store._queues_txn(txn)[0] == Queue("b", 1, 2, 1000, 0)


def test_proven_entries_are_read_through_their_index(txn: Txn) -> None:
    txn.execute(
        "EXPLAIN QUERY PLAN SELECT entry_id FROM synapse_relay_entries"
        f" WHERE destination = 'b' {store._PROVEN} ORDER BY entry_id LIMIT 1"
    )
    assert "synapse_relay_entries_proven" in str(txn.fetchall())
