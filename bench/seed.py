"""Seeding a relay's backlog straight into its tables (`synapse_relay_entries` and
the `synapse_relay_queues` totals), in large batches, while the relay is stopped:
a million deposits through the API would take an hour.

Every entry is a realistic transaction (`bench.common.realistic_transaction`)
with its own origin, transaction id and destination, rendered from one template
so that a million of them cost seconds, not minutes, to build, and stored as the
relay stores it (compressed, `synapse_relay.compression`).
"""

import io
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg2
from canonicaljson import encode_canonical_json

from bench.common import BenchError, realistic_transaction, sqlite_path
from synapse_relay import compression
from synapse_relay.loopback import Homeserver

BATCH = 20_000
ORIGINS = 16
_MARKS = {"origin": "ORIGIN\x01", "destination": "DEST\x01", "txn_id": "TXNID\x01"}
# The columns of an entry that `backlog_rows` gives, in order.
COLUMNS = "destination, origin, txn_id, received_ts, size, txn_json, txn_compressed"
Row = tuple[str, str, str, int, int, str, bytes]


@dataclass
class Seeded:
    entries: int
    destinations: int
    # bytes of transaction JSON queued (the sum of the entries' `size`)
    bytes: int
    seconds: float
    # growth of the database (SQLite: its files; PostgreSQL: the entries table
    # with its indexes and TOAST)
    database_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "entries": self.entries,
            "destinations": self.destinations,
            "transaction_bytes": self.bytes,
            "seconds": round(self.seconds, 1),
            "entries_per_second": round(self.entries / max(self.seconds, 1e-9)),
            "database_bytes": self.database_bytes,
            "database_bytes_per_queued_byte": round(
                self.database_bytes / max(self.bytes, 1), 3
            ),
        }


def _template(now_ms: int) -> str:
    """A stored transaction's canonical JSON with `str.format` fields for its
    origin, destination and transaction id."""
    transaction = realistic_transaction(
        _MARKS["origin"], _MARKS["destination"], 0, now_ms
    )
    transaction["transaction_id"] = _MARKS["txn_id"]
    text = encode_canonical_json(transaction).decode("utf-8")
    text = text.replace("{", "{{").replace("}", "}}")
    for field, mark in _MARKS.items():
        # canonical JSON writes the control character as \u0001
        text = text.replace(mark.replace("\x01", "\\u0001"), "{" + field + "}")
    if "\\" in text or "\t" in text or "\n" in text:
        raise BenchError("the backlog template must need no escaping in COPY")
    return text


def backlog_rows(count: int, destinations: int, now_ms: int) -> Iterator[Row]:
    """The `COLUMNS` of `count` entries spread evenly over `destinations`
    destinations, oldest first, all received within the last `count`
    milliseconds (well inside any retention)."""
    template = _template(now_ms)
    for number in range(count):
        destination = f"backlog{number % destinations:05d}.invalid"
        origin = f"origin{number % ORIGINS:02d}.invalid"
        txn_id = f"backlog{number:09d}"
        txn_json = template.format(
            origin=origin, destination=destination, txn_id=txn_id
        )
        yield (
            destination,
            origin,
            txn_id,
            now_ms - count + number,
            len(txn_json),
            "",
            compression.compress(txn_json),
        )


_INSERT_QUEUE = (
    "INSERT INTO synapse_relay_queues (destination, transactions, bytes)"
    " VALUES ({p}, {p}, {p}) ON CONFLICT (destination) DO UPDATE SET"
    " transactions = synapse_relay_queues.transactions + excluded.transactions,"
    " bytes = synapse_relay_queues.bytes + excluded.bytes"
)


def seed_sqlite(
    relay: Homeserver, count: int, destinations: int, now_ms: int
) -> Seeded:
    """Seed a stopped relay's SQLite database."""
    if relay.is_running:
        raise BenchError("seed SQLite only while the relay is stopped")
    path = sqlite_path(relay)
    before = _files_size(path)
    started = time.monotonic()
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        # Rollback journal and no syncs for the bulk load; Synapse switches the
        # database back to WAL mode when it connects.
        connection.execute("PRAGMA journal_mode = DELETE")
        connection.execute("PRAGMA synchronous = OFF")
        connection.execute("PRAGMA cache_size = -262144")
        counts: Counter[str] = Counter()
        sizes: Counter[str] = Counter()
        batch: list[Row] = []

        def flush() -> None:
            connection.execute("BEGIN")
            connection.executemany(
                f"INSERT INTO synapse_relay_entries ({COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                batch,
            )
            connection.execute("COMMIT")
            batch.clear()

        for row in backlog_rows(count, destinations, now_ms):
            batch.append(row)
            counts[row[0]] += 1
            sizes[row[0]] += row[4]
            if len(batch) >= BATCH:
                flush()
        if batch:
            flush()
        connection.execute("BEGIN")
        connection.executemany(
            _INSERT_QUEUE.format(p="?"),
            [(d, counts[d], sizes[d]) for d in counts],
        )
        connection.execute("COMMIT")
        connection.execute("PRAGMA journal_mode = WAL")
    finally:
        connection.close()
    return Seeded(
        entries=count,
        destinations=len(counts),
        bytes=sum(sizes.values()),
        seconds=time.monotonic() - started,
        database_bytes=_files_size(path) - before,
    )


def _files_size(path: Any) -> int:
    return sum(
        p.stat().st_size
        for p in (path, path.with_name(path.name + "-wal"))
        if p.exists()
    )


class _CopyStream(io.RawIOBase):
    """The rows as PostgreSQL COPY text, read in chunks by psycopg2."""

    def __init__(self, rows: Iterator[tuple[Any, ...]]) -> None:
        self._rows = rows
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        parts = [self._buffer]
        length = len(self._buffer)
        while size < 0 or length < size:
            try:
                row = next(self._rows)
            except StopIteration:
                break
            line = ("\t".join(_copy_text(v) for v in row) + "\n").encode("utf-8")
            parts.append(line)
            length += len(line)
        data = b"".join(parts)
        if size < 0:
            size = len(data)
        chunk, self._buffer = data[:size], data[size:]
        return chunk


def _copy_text(value: Any) -> str:
    """A value in COPY's text format (bytes as BYTEA hex, its backslash escaped)."""
    return "\\\\x" + value.hex() if isinstance(value, bytes) else str(value)


def _connect(relay: Homeserver) -> Any:
    if relay.database is None or relay.database.get("name") != "psycopg2":
        raise BenchError(f"{relay} does not use PostgreSQL")
    args = relay.database["args"]
    return psycopg2.connect(
        host=args["host"],
        port=args["port"],
        user=args["user"],
        dbname=args["database"],
    )


def seed_postgres(
    relay: Homeserver, count: int, destinations: int, now_ms: int
) -> Seeded:
    """Seed a (stopped) relay's PostgreSQL database with COPY."""
    connection = _connect(relay)
    started = time.monotonic()
    try:
        counts: Counter[str] = Counter()
        sizes: Counter[str] = Counter()

        def counted() -> Iterator[tuple[Any, ...]]:
            for row in backlog_rows(count, destinations, now_ms):
                counts[row[0]] += 1
                sizes[row[0]] += row[4]
                yield row

        with connection, connection.cursor() as cursor:
            cursor.execute("SELECT pg_total_relation_size('synapse_relay_entries')")
            (before,) = cursor.fetchone()
            cursor.copy_expert(
                f"COPY synapse_relay_entries ({COLUMNS}) FROM STDIN",
                _CopyStream(counted()),
                size=1 << 20,
            )
            cursor.executemany(
                _INSERT_QUEUE.format(p="%s"),
                [(d, counts[d], sizes[d]) for d in counts],
            )
        connection.autocommit = True
        with connection.cursor() as cursor:
            # What autovacuum would have done while the backlog grew.
            cursor.execute("VACUUM ANALYZE synapse_relay_entries")
            cursor.execute("CHECKPOINT")
            cursor.execute("SELECT pg_total_relation_size('synapse_relay_entries')")
            (after,) = cursor.fetchone()
    finally:
        connection.close()
    return Seeded(
        entries=count,
        destinations=len(counts),
        bytes=sum(sizes.values()),
        seconds=time.monotonic() - started,
        database_bytes=after - before,
    )
