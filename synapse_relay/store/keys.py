"""The relay role's key mailbox (`synapse_relay.keys`): snapshots of a server's
users' keys and the one-time keys escrowed for them.

- `synapse_relay_key_snapshots` (schema version 4): per (server, user) the newest
  owner-signed snapshot of the user's devices and keys (`ts` is the snapshot's own);
- `synapse_relay_key_stock` (schema version 4): the one-time keys escrowed per
  device, each handed out at most once: a claim deletes the row it returns in the
  same commit.

Quotas per server (`KeyQuota`): the users whose snapshots are held, and the keys in
escrow per device.

Several processes (Synapse workers) may serve the key endpoints, so nothing here
relies on a lock in this process; uploads and claims run at READ COMMITTED on
PostgreSQL (`run_read_committed`), where they cause no serialization failure. An
upload first locks the server's totals row of the relay queue (`lock_queues`, the
one row per destination there is): uploads of one server take turns across all
processes, so its quotas are exact and an older snapshot never replaces a newer
one. A claim takes each key it returns with `FOR UPDATE SKIP LOCKED` and deletes it
in the same transaction: a key another claim took is locked (skipped) or gone (not
seen), so no key is returned twice. SQLite has one writer at a time.
"""

import attr

from synapse_relay._synapse import is_postgres
from synapse_relay._synapse.database import LoggingTransaction, run_read_committed
from synapse_relay.store.entries import QuotaExceeded, lock_queues
from synapse_relay.store.schema import SchemaStore


@attr.s(frozen=True, auto_attribs=True)
class KeySnapshot:
    """An owner-signed snapshot of one user's keys, as the relay stores it."""

    user_id: str
    ts: int
    snapshot_json: str
    # the devices it lists: escrowed keys of other devices are dropped with it
    device_ids: frozenset[str]


@attr.s(frozen=True, auto_attribs=True)
class EscrowedKey:
    user_id: str
    device_id: str
    algorithm: str
    key_id: str
    key_json: str


@attr.s(frozen=True, auto_attribs=True)
class KeyQuota:
    max_users: int
    max_stock_per_device: int


# user ID -> device ID -> algorithm -> escrowed one-time keys left
Stock = dict[str, dict[str, dict[str, int]]]


class KeyStore(SchemaStore):
    """The snapshots and escrowed keys the relay holds for each server."""

    async def store_key_snapshots(
        self,
        server_name: str,
        snapshots: list[KeySnapshot],
        keys: list[EscrowedKey],
        quota: KeyQuota,
        now_ms: int,
    ) -> int:
        """Store the snapshots (each unless an equally new or newer one is stored)
        and escrow the keys, all in one commit; QuotaExceeded (nothing stored) if
        it does not fit. Returns how many snapshots replaced older ones."""
        await self.ensure_schema()
        return await run_read_committed(
            self._api,
            "synapse_relay_store_key_snapshots",
            _store_key_snapshots_txn,
            server_name,
            snapshots,
            keys,
            quota,
            now_ms,
        )

    async def key_snapshots(
        self, server_name: str, user_ids: list[str] | None
    ) -> dict[str, str]:
        """user ID -> snapshot JSON, for the given users (all when None)."""
        await self.ensure_schema()
        return await self._api.run_db_interaction(
            "synapse_relay_key_snapshots", _key_snapshots_txn, server_name, user_ids
        )

    async def key_holdings(self, server_name: str) -> tuple[dict[str, int], Stock]:
        """The users whose snapshots are held (user ID -> snapshot ts), and how
        many keys are left in escrow per device (devices with none are absent)."""
        await self.ensure_schema()
        return await self._api.run_db_interaction(
            "synapse_relay_key_holdings", _key_holdings_txn, server_name
        )

    async def claim_escrowed_keys(
        self, server_name: str, wanted: list[tuple[str, str, str]]
    ) -> dict[tuple[str, str, str], tuple[str, str]]:
        """Take one escrowed key of each (user, device, algorithm), oldest first:
        (user, device, algorithm) -> (key ID, key JSON), for those that had one.
        A key is returned by at most one claim, whatever runs concurrently."""
        await self.ensure_schema()
        return await run_read_committed(
            self._api,
            "synapse_relay_claim_escrowed_keys",
            _claim_escrowed_keys_txn,
            server_name,
            wanted,
        )


def _count(txn: LoggingTransaction) -> int:
    """The result of the `SELECT COUNT(*) ...` just executed."""
    row = txn.fetchone()
    assert row is not None  # COUNT(*) always has a row
    return int(row[0])


def _store_key_snapshots_txn(
    txn: LoggingTransaction,
    server_name: str,
    snapshots: list[KeySnapshot],
    keys: list[EscrowedKey],
    quota: KeyQuota,
    now_ms: int,
) -> int:
    # Uploads of this server take turns, in every process (module docstring).
    lock_queues(txn, [server_name])
    replaced = 0
    for snapshot in snapshots:
        txn.execute(
            "SELECT ts FROM synapse_relay_key_snapshots"
            " WHERE server_name = ? AND user_id = ?",
            (server_name, snapshot.user_id),
        )
        row = txn.fetchone()
        if row is not None and row[0] >= snapshot.ts:
            continue
        replaced += 1
        txn.execute(
            "INSERT INTO synapse_relay_key_snapshots"
            " (server_name, user_id, ts, snapshot_json) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (server_name, user_id) DO UPDATE SET"
            " ts = excluded.ts, snapshot_json = excluded.snapshot_json",
            (server_name, snapshot.user_id, snapshot.ts, snapshot.snapshot_json),
        )
        # A device the owner no longer lists takes its escrowed keys with it.
        txn.execute(
            "SELECT DISTINCT device_id FROM synapse_relay_key_stock"
            " WHERE server_name = ? AND user_id = ?",
            (server_name, snapshot.user_id),
        )
        for (device_id,) in list(txn):
            if device_id not in snapshot.device_ids:
                txn.execute(
                    "DELETE FROM synapse_relay_key_stock WHERE server_name = ?"
                    " AND user_id = ? AND device_id = ?",
                    (server_name, snapshot.user_id, device_id),
                )
    txn.execute(
        "SELECT COUNT(*) FROM synapse_relay_key_snapshots WHERE server_name = ?",
        (server_name,),
    )
    users = _count(txn)
    if users > quota.max_users:
        raise QuotaExceeded(
            f"{server_name} would have keys of {users} users here, at most"
            f" {quota.max_users}"
        )
    for key in keys:
        txn.execute(
            "INSERT INTO synapse_relay_key_stock (server_name, user_id, device_id,"
            " algorithm, key_id, added_ts, key_json) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (server_name, user_id, device_id, algorithm, key_id)"
            " DO NOTHING",
            (
                server_name,
                key.user_id,
                key.device_id,
                key.algorithm,
                key.key_id,
                now_ms,
                key.key_json,
            ),
        )
    for user_id, device_id in {(k.user_id, k.device_id) for k in keys}:
        txn.execute(
            "SELECT COUNT(*) FROM synapse_relay_key_stock"
            " WHERE server_name = ? AND user_id = ? AND device_id = ?",
            (server_name, user_id, device_id),
        )
        stock = _count(txn)
        if stock > quota.max_stock_per_device:
            raise QuotaExceeded(
                f"{user_id}'s device {device_id} would have {stock} one-time keys in"
                f" escrow here, at most {quota.max_stock_per_device}"
            )
    return replaced


def _key_snapshots_txn(
    txn: LoggingTransaction, server_name: str, user_ids: list[str] | None
) -> dict[str, str]:
    if user_ids is None:
        txn.execute(
            "SELECT user_id, snapshot_json FROM synapse_relay_key_snapshots"
            " WHERE server_name = ?",
            (server_name,),
        )
        return dict(txn)
    result = {}
    for user_id in user_ids:
        txn.execute(
            "SELECT snapshot_json FROM synapse_relay_key_snapshots"
            " WHERE server_name = ? AND user_id = ?",
            (server_name, user_id),
        )
        row = txn.fetchone()
        if row is not None:
            result[user_id] = row[0]
    return result


def _key_holdings_txn(
    txn: LoggingTransaction, server_name: str
) -> tuple[dict[str, int], Stock]:
    txn.execute(
        "SELECT user_id, ts FROM synapse_relay_key_snapshots WHERE server_name = ?",
        (server_name,),
    )
    users: dict[str, int] = dict(txn.fetchall())
    txn.execute(
        "SELECT user_id, device_id, algorithm, COUNT(*) FROM synapse_relay_key_stock"
        " WHERE server_name = ? GROUP BY user_id, device_id, algorithm",
        (server_name,),
    )
    stock: Stock = {}
    for user_id, device_id, algorithm, count in txn:
        stock.setdefault(user_id, {}).setdefault(device_id, {})[algorithm] = count
    return users, stock


def _claim_escrowed_keys_txn(
    txn: LoggingTransaction, server_name: str, wanted: list[tuple[str, str, str]]
) -> dict[tuple[str, str, str], tuple[str, str]]:
    # On PostgreSQL (READ COMMITTED) a row a concurrent claim or upload locked is
    # skipped, and one it deleted before this statement began is not seen (nor
    # returned if it commits the delete while this statement runs): the row
    # returned is this transaction's until it ends. SQLite has one writer at a time.
    lock = " FOR UPDATE SKIP LOCKED" if is_postgres(txn) else ""
    claimed = {}
    for user_id, device_id, algorithm in wanted:
        txn.execute(
            "SELECT key_id, key_json FROM synapse_relay_key_stock"
            " WHERE server_name = ? AND user_id = ? AND device_id = ?"
            " AND algorithm = ? ORDER BY added_ts, key_id LIMIT 1" + lock,
            (server_name, user_id, device_id, algorithm),
        )
        row = txn.fetchone()
        if row is None:
            continue
        txn.execute(
            "DELETE FROM synapse_relay_key_stock WHERE server_name = ?"
            " AND user_id = ? AND device_id = ? AND algorithm = ? AND key_id = ?",
            (server_name, user_id, device_id, algorithm, row[0]),
        )
        if txn.rowcount != 1:
            raise RuntimeError(f"escrowed key {row[0]} vanished while claimed")
        claimed[user_id, device_id, algorithm] = (row[0], row[1])
    return claimed
