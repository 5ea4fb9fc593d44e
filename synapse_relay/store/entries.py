"""The relay queue: the transactions other servers deposit for a destination
(`PUT send_relay`), until it collects and acknowledges them (docs/deposits.rst).

Two tables:

- `synapse_relay_entries`: one row per stored transaction (an *entry*). `entry_id`
  never repeats (AUTOINCREMENT / identity), so an acknowledgement can never hit a
  newer entry that reused an old id. FIFO per destination is `ORDER BY entry_id` on
  the (destination, entry_id) index; idempotency is the unique
  (origin, txn_id, destination) index. `origin_auth` is the entry's origin proof
  (DESIGN.md section 2b, JSON `{"key": "ed25519:...", "sig": "..."}`), NULL for an
  unproven entry; `txn_json` is always the transaction's six fields alone. Since
  schema version 6 the transaction is stored compressed in `txn_compressed` (see
  compression.py) and `txn_json` is empty; entries written before keep their
  `txn_json` and are read as they are. `size` is always the uncompressed size:
  quotas count transaction JSON, not what it costs on disk.
- `synapse_relay_queues`: per-destination totals (transactions, bytes), updated in
  the same database transaction as the entries, so that quotas cost one indexed
  lookup however many entries are queued.

Deposits are committed in groups (group_commit.py): one database transaction for
the deposits that arrived while the previous one committed.

Several processes (Synapse workers) may serve the relay endpoints, so nothing here
relies on a lock in this process. The functions that change entries run at READ
COMMITTED on PostgreSQL (`run_read_committed`) and first lock the totals row of
each destination they change (`lock_queues`, in sorted order, so two transactions
never wait for each other): changes of one destination's queue take turns across
all processes, and no serialization failure can happen. Key uploads of a server
take turns through the same row (keys.py).
"""

from collections import Counter
from collections.abc import Iterable, Sequence

import attr
from synapse.module_api import ModuleApi

from synapse_relay import compression
from synapse_relay._synapse.database import LoggingTransaction, run_read_committed
from synapse_relay.group_commit import GroupCommit
from synapse_relay.store.schema import PROVEN, SchemaStore

PURGE_BATCH = 1000
# Deposits committed in one database transaction at most.
DEPOSIT_BATCH = 100
# Totals rows locked by one statement at most.
LOCK_CHUNK = 100


class QuotaExceeded(Exception):
    """A deposit would take the destination over one of its quotas: its queue's
    here, its keys' in keys.py."""


@attr.s(frozen=True, auto_attribs=True)
class NewEntry:
    origin: str
    txn_id: str
    destination: str
    txn_json: str
    received_ms: int
    # the origin proof as JSON text, None for an unproven deposit
    origin_auth: str | None = None


@attr.s(frozen=True, auto_attribs=True)
class Quota:
    max_transactions: int
    max_bytes: int


@attr.s(frozen=True, auto_attribs=True)
class Deposit:
    entry_id: int
    # True when this (origin, txn_id, destination) was already stored
    duplicate: bool


@attr.s(frozen=True, auto_attribs=True)
class Entry:
    entry_id: int
    txn_json: str
    # the origin proof as JSON text, None for an unproven entry
    origin_auth: str | None = None


@attr.s(frozen=True, auto_attribs=True)
class Collected:
    # whether the acknowledged entry existed (for this destination) and was deleted
    acknowledged: bool
    # the destination's oldest remaining entry
    entry: Entry | None


@attr.s(frozen=True, auto_attribs=True)
class CollectedBatch:
    # how many of the acknowledged entries existed (for this destination) and
    # were deleted
    acknowledged: int
    # the destination's oldest remaining entries, in entry order
    entries: list[Entry]
    # whether more entries remain after these
    more: bool


@attr.s(frozen=True, auto_attribs=True)
class Queue:
    destination: str
    transactions: int
    bytes: int
    oldest_ts: int | None
    # how many of the queued transactions carry an origin proof
    proven: int


class EntryStore(SchemaStore):
    """The relay queue of every destination."""

    def __init__(self, api: ModuleApi) -> None:
        super().__init__(api)
        self._deposits: GroupCommit[tuple[NewEntry, Quota], Deposit] = GroupCommit(
            api, "synapse_relay_deposits", self._commit_deposits, DEPOSIT_BATCH
        )

    async def deposit(self, entry: NewEntry, quota: Quota) -> Deposit:
        """Store a transaction once, committed when this returns (with the other
        deposits of its group); QuotaExceeded if it does not fit."""
        await self.ensure_schema()
        return await self._deposits.submit((entry, quota))

    async def _commit_deposits(
        self, deposits: Sequence[tuple[NewEntry, Quota]]
    ) -> list[Deposit | QuotaExceeded]:
        return await run_read_committed(
            self._api, "synapse_relay_deposit", _deposit_batch_txn, deposits
        )

    async def acknowledge_and_get_oldest(
        self, destination: str, acknowledged_entry_id: int
    ) -> Collected:
        """Delete the acknowledged entry (if it is this destination's), in the same
        commit return the destination's oldest remaining entry."""
        await self.ensure_schema()
        return await run_read_committed(
            self._api,
            "synapse_relay_collect",
            _acknowledge_and_get_oldest_txn,
            destination,
            acknowledged_entry_id,
        )

    async def acknowledge(self, destination: str, entry_id: int) -> bool:
        """Delete entry `entry_id` if it is `destination`'s, as its owner's
        acknowledgement does; whether it was there."""
        await self.ensure_schema()
        return await run_read_committed(
            self._api,
            "synapse_relay_acknowledge",
            _acknowledge_txn,
            destination,
            entry_id,
        )

    async def oldest_proven_entry(self, destination: str) -> Entry | None:
        """The destination's oldest entry that carries an origin proof."""
        await self.ensure_schema()
        return await self._api.run_db_interaction(
            "synapse_relay_oldest_proven",
            _oldest_entry_txn,
            destination,
            PROVEN,
        )

    async def destinations_with_proven_entries(self) -> list[str]:
        await self.ensure_schema()
        return await self._api.run_db_interaction(
            "synapse_relay_proven_destinations", _destinations_with_proven_entries_txn
        )

    async def acknowledge_and_get_batch(
        self, destination: str, acknowledged: list[int], limit: int, max_bytes: int
    ) -> CollectedBatch:
        """Delete the acknowledged entries that are this destination's, in the same
        commit return its oldest remaining entries: at most `limit`, whose
        transactions add up to at most `max_bytes` (the first one always)."""
        await self.ensure_schema()
        return await run_read_committed(
            self._api,
            "synapse_relay_collect_batch",
            _acknowledge_and_get_batch_txn,
            destination,
            acknowledged,
            limit,
            max_bytes,
        )

    async def queues(self) -> list[Queue]:
        await self.ensure_schema()
        return await self._api.run_db_interaction("synapse_relay_queues", _queues_txn)

    async def purge_received_before(self, before_ms: int) -> int:
        """Delete every entry received before `before_ms`; returns how many."""
        await self.ensure_schema()
        purged = 0
        while True:
            batch = await run_read_committed(
                self._api,
                "synapse_relay_purge",
                _purge_batch_txn,
                before_ms,
                PURGE_BATCH,
            )
            purged += batch
            if batch < PURGE_BATCH:
                return purged


def lock_queues(
    txn: LoggingTransaction, destinations: Iterable[str]
) -> dict[str, tuple[int, int]]:
    """Lock the totals rows of `destinations` (created empty if absent) until the
    end of the transaction, in sorted order; their (transactions, bytes).

    On PostgreSQL at READ COMMITTED, `ON CONFLICT DO UPDATE` locks the row, waiting
    for a transaction of another process that holds it, and returns its committed
    values. SQLite has one writer at a time.
    """
    totals = {}
    ordered = sorted(set(destinations))
    # One statement per 100 destinations (SQLite before 3.32 takes at most 999
    # parameters), locking the rows in the order of the list.
    for start in range(0, len(ordered), LOCK_CHUNK):
        chunk = ordered[start : start + LOCK_CHUNK]
        values = ", ".join("(?, 0, 0)" for _ in chunk)
        txn.execute(
            "INSERT INTO synapse_relay_queues (destination, transactions, bytes)"
            f" VALUES {values} ON CONFLICT (destination) DO UPDATE SET"
            " transactions = synapse_relay_queues.transactions"
            " RETURNING destination, transactions, bytes",
            chunk,
        )
        for destination, transactions, used in txn.fetchall():
            totals[destination] = (transactions, used)
    return totals


def _deposit_batch_txn(
    txn: LoggingTransaction, deposits: Sequence[tuple[NewEntry, Quota]]
) -> list[Deposit | QuotaExceeded]:
    """Store each deposit once, in order (entry ids follow it), each refused on its
    own when it does not fit its destination's quota.

    A few statements whatever the number of deposits: lock the destinations'
    totals (one each), find the transactions already stored (one), insert the
    others (one), update the totals (one each). With the totals locked, no other
    transaction stores anything for these destinations meanwhile.
    """
    before = lock_queues(txn, (entry.destination for entry, _ in deposits))
    ids = _stored_entry_ids(txn, {_key(entry) for entry, _ in deposits})
    totals = dict(before)
    new: dict[_Key, tuple[NewEntry, int]] = {}  # in deposit order
    # per deposit: its refusal, or its key and whether it is a duplicate
    answers: list[QuotaExceeded | tuple[_Key, bool]] = []
    for entry, quota in deposits:
        key = _key(entry)
        if key in ids or key in new:
            # already stored: accepted whatever the quota says
            answers.append((key, True))
            continue
        transactions, used = totals[entry.destination]
        size = len(entry.txn_json.encode("utf-8"))
        refusal = _quota_refusal(entry.destination, transactions, used, size, quota)
        if refusal is not None:
            answers.append(refusal)
            continue
        totals[entry.destination] = (transactions + 1, used + size)
        new[key] = (entry, size)
        answers.append((key, False))
    ids.update(_insert_entries(txn, list(new.values())))
    txn.execute_batch(
        "UPDATE synapse_relay_queues SET transactions = ?, bytes = ?"
        " WHERE destination = ?",
        [
            (transactions, used, destination)
            for destination, (transactions, used) in totals.items()
            if (transactions, used) != before[destination]
        ],
    )
    return [
        answer
        if isinstance(answer, QuotaExceeded)
        else Deposit(entry_id=ids[answer[0]], duplicate=answer[1])
        for answer in answers
    ]


# (origin, txn_id, destination): what a stored transaction is unique by
_Key = tuple[str, str, str]


def _key(entry: NewEntry) -> _Key:
    return (entry.origin, entry.txn_id, entry.destination)


def _stored_entry_ids(txn: LoggingTransaction, keys: set[_Key]) -> dict[_Key, int]:
    """The entry ids of those of `keys` already stored."""
    if not keys:
        return {}
    # A join on a VALUES list: both SQLite and PostgreSQL look each key up in the
    # unique index (SQLite scans the whole index for `(a, b, c) IN (VALUES ...)`).
    values = ", ".join("(?, ?, ?)" for _ in keys)
    txn.execute(
        "SELECT e.origin, e.txn_id, e.destination, e.entry_id"
        f" FROM (VALUES {values}) AS k JOIN synapse_relay_entries AS e"
        " ON e.origin = k.column1 AND e.txn_id = k.column2"
        " AND e.destination = k.column3",
        [value for key in keys for value in key],
    )
    return {
        (origin, txn_id, dest): int(n) for origin, txn_id, dest, n in txn.fetchall()
    }


def _insert_entries(
    txn: LoggingTransaction, entries: list[tuple[NewEntry, int]]
) -> dict[_Key, int]:
    """Insert (entry, size)s in one statement, their ids growing in list order."""
    if not entries:
        return {}
    values = ", ".join("(?, ?, ?, ?, ?, '', ?, ?)" for _ in entries)
    txn.execute(
        "INSERT INTO synapse_relay_entries (destination, origin, txn_id,"
        f" received_ts, size, txn_json, origin_auth, txn_compressed) VALUES {values}"
        " RETURNING origin, txn_id, destination, entry_id",
        [
            value
            for entry, size in entries
            for value in (
                entry.destination,
                entry.origin,
                entry.txn_id,
                entry.received_ms,
                size,
                entry.origin_auth,
                # Synapse refuses `bytes` parameters on PostgreSQL (against text
                # passed as bytes by mistake, engines/postgres.py): memoryview it is.
                memoryview(compression.compress(entry.txn_json)),
            )
        ],
    )
    return {
        (origin, txn_id, dest): int(n) for origin, txn_id, dest, n in txn.fetchall()
    }


def _quota_refusal(
    destination: str, transactions: int, used: int, size: int, quota: Quota
) -> QuotaExceeded | None:
    if transactions + 1 > quota.max_transactions:
        return QuotaExceeded(
            f"{destination} already has {transactions} transactions queued"
            f" (max_transactions_per_destination is {quota.max_transactions})"
        )
    if used + size > quota.max_bytes:
        return QuotaExceeded(
            f"{destination} already has {used} bytes queued and this transaction has"
            f" {size} (max_bytes_per_destination is {quota.max_bytes})"
        )
    return None


def stored_txn_json(txn_json: str, txn_compressed: bytes | None) -> str:
    """The transaction JSON of an entry row, whichever schema version wrote it."""
    if txn_compressed is None:
        return txn_json
    return compression.decompress(bytes(txn_compressed))


def _acknowledge_and_get_oldest_txn(
    txn: LoggingTransaction, destination: str, acknowledged_entry_id: int
) -> Collected:
    acknowledged = acknowledged_entry_id > 0 and _acknowledge_txn(
        txn, destination, acknowledged_entry_id
    )
    return Collected(
        acknowledged=acknowledged, entry=_oldest_entry_txn(txn, destination, "")
    )


def _acknowledge_txn(txn: LoggingTransaction, destination: str, entry_id: int) -> bool:
    """Delete exactly this entry, and only if it is this destination's (never a
    range, since entry ids may commit out of order); whether it was there."""
    lock_queues(txn, [destination])
    txn.execute(
        "DELETE FROM synapse_relay_entries WHERE entry_id = ? AND destination = ?"
        " RETURNING size",
        (entry_id, destination),
    )
    row = txn.fetchone()
    if row is None:
        return False
    _shrink_queue(txn, destination, 1, row[0])
    return True


def _oldest_entry_txn(
    txn: LoggingTransaction, destination: str, condition: str
) -> Entry | None:
    """The destination's oldest entry, of those meeting the SQL `condition` (which
    starts with AND) if one is given."""
    txn.execute(
        "SELECT entry_id, txn_json, txn_compressed, origin_auth"
        " FROM synapse_relay_entries"
        f" WHERE destination = ? {condition} ORDER BY entry_id LIMIT 1",
        (destination,),
    )
    row = txn.fetchone()
    if row is None:
        return None
    return Entry(
        entry_id=row[0], txn_json=stored_txn_json(row[1], row[2]), origin_auth=row[3]
    )


def _destinations_with_proven_entries_txn(txn: LoggingTransaction) -> list[str]:
    txn.execute(
        "SELECT q.destination FROM synapse_relay_queues AS q"
        " WHERE q.transactions > 0 AND EXISTS (SELECT 1 FROM synapse_relay_entries AS e"
        f"  WHERE e.destination = q.destination {PROVEN})"
        " ORDER BY q.destination"
    )
    return [destination for (destination,) in txn.fetchall()]


def _acknowledge_and_get_batch_txn(
    txn: LoggingTransaction,
    destination: str,
    acknowledged: list[int],
    limit: int,
    max_bytes: int,
) -> CollectedBatch:
    deleted = 0
    if acknowledged:
        lock_queues(txn, [destination])
        # Exactly these entries, and only those of this destination.
        placeholders = ", ".join("?" for _ in acknowledged)
        txn.execute(
            "DELETE FROM synapse_relay_entries"
            f" WHERE destination = ? AND entry_id IN ({placeholders}) RETURNING size",
            (destination, *acknowledged),
        )
        sizes = [size for (size,) in txn.fetchall()]
        deleted = len(sizes)
        if deleted:
            _shrink_queue(txn, destination, deleted, sum(sizes))
    # One row more than asked for tells whether more remain.
    txn.execute(
        "SELECT entry_id, txn_json, txn_compressed, origin_auth, size"
        " FROM synapse_relay_entries WHERE destination = ? ORDER BY entry_id LIMIT ?",
        (destination, limit + 1),
    )
    rows = txn.fetchall()
    entries: list[Entry] = []
    used = 0
    for entry_id, txn_json, txn_compressed, origin_auth, size in rows[:limit]:
        if entries and used + size > max_bytes:
            break
        entries.append(
            Entry(entry_id, stored_txn_json(txn_json, txn_compressed), origin_auth)
        )
        used += size
    return CollectedBatch(
        acknowledged=deleted, entries=entries, more=len(rows) > len(entries)
    )


def _queues_txn(txn: LoggingTransaction) -> list[Queue]:
    txn.execute(
        "SELECT q.destination, q.transactions, q.bytes,"
        " (SELECT e.received_ts FROM synapse_relay_entries AS e"
        "  WHERE e.destination = q.destination ORDER BY e.entry_id LIMIT 1),"
        " (SELECT COUNT(*) FROM synapse_relay_entries AS e"
        "  WHERE e.destination = q.destination AND e.origin_auth IS NOT NULL)"
        " FROM synapse_relay_queues AS q WHERE q.transactions > 0"
        " ORDER BY q.destination"
    )
    return [Queue(*row) for row in txn.fetchall()]


def _purge_batch_txn(txn: LoggingTransaction, before_ms: int, limit: int) -> int:
    oldest = (
        "SELECT entry_id FROM synapse_relay_entries"
        " WHERE received_ts < ? ORDER BY received_ts LIMIT ?"
    )
    txn.execute(
        "SELECT DISTINCT destination FROM synapse_relay_entries"
        f" WHERE entry_id IN ({oldest})",
        (before_ms, limit),
    )
    lock_queues(txn, [destination for (destination,) in txn.fetchall()])
    # What is deleted, not what was selected: a collector may have acknowledged
    # some of them meanwhile.
    txn.execute(
        f"DELETE FROM synapse_relay_entries WHERE entry_id IN ({oldest})"
        " RETURNING destination, size",
        (before_ms, limit),
    )
    rows = txn.fetchall()
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    for destination, size in rows:
        counts[destination] += 1
        sizes[destination] += size
    for destination in sorted(counts):
        _shrink_queue(txn, destination, counts[destination], sizes[destination])
    return len(rows)


def _shrink_queue(
    txn: LoggingTransaction, destination: str, transactions: int, size: int
) -> None:
    txn.execute(
        "UPDATE synapse_relay_queues SET transactions = transactions - ?,"
        " bytes = bytes - ? WHERE destination = ?",
        (transactions, size, destination),
    )
