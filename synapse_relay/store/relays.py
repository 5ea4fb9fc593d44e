"""Which relays serve which server: the send role's relays per destination, set
through the admin API or discovered, and the relay role's registered servers.

- `synapse_relay_send_relays` (send role, schema version 2): the relays of a
  destination set through the admin API, overriding the `send.relays`
  configuration for that destination; `relays` is a JSON list of server names (an
  empty list means "no relays").
- `synapse_relay_discovered` (send role, schema version 7, discovery.py): the
  newest valid advertisement of each destination's relays, verified when it was
  fetched: its `relays` (JSON list), `ts`, `valid_until_ts`, when it was last
  fetched (`fetched_ts`) and the signed advertisement itself (`advertisement`, for
  audit).
- `synapse_relay_registered` (relay role, schema version 7): servers that proved
  who they are by collecting from this relay, and when they last did
  (`relay.serve_registered`).

Each change is one statement on one row, at Synapse's default isolation (two
processes changing the same row at once are rare; Synapse retries the one that
fails).
"""

import json

import attr

from synapse_relay._synapse.database import LoggingTransaction
from synapse_relay.store.schema import SchemaStore


@attr.s(frozen=True, auto_attribs=True)
class Advertisement:
    """A destination's relays, as its signed advertisement stated them."""

    destination: str
    relays: tuple[str, ...]
    ts: int
    valid_until_ts: int


@attr.s(frozen=True, auto_attribs=True)
class Discovered:
    """An advertisement held, and when it was last fetched."""

    advertisement: Advertisement
    fetched_ts: int


class RelayListStore(SchemaStore):
    """The relays of destinations, and the servers registered with this relay."""

    async def send_relays(self) -> dict[str, tuple[str, ...]]:
        """Every destination's relays set through the admin API."""
        await self.ensure_schema()
        return await self._api.run_db_interaction(
            "synapse_relay_send_relays", _send_relays_txn
        )

    async def send_relays_for(self, destination: str) -> tuple[str, ...] | None:
        """The relays of `destination` set through the admin API, None if unset."""
        await self.ensure_schema()
        return await self._api.run_db_interaction(
            "synapse_relay_send_relays_for", _send_relays_for_txn, destination
        )

    async def set_send_relays(self, destination: str, relays: tuple[str, ...]) -> None:
        await self.ensure_schema()
        await self._api.run_db_interaction(
            "synapse_relay_set_send_relays",
            _set_send_relays_txn,
            destination,
            json.dumps(list(relays)),
        )

    async def delete_send_relays(self, destination: str) -> bool:
        """Forget the admin API's relays of `destination`; whether there were any."""
        await self.ensure_schema()
        return await self._api.run_db_interaction(
            "synapse_relay_delete_send_relays", _delete_send_relays_txn, destination
        )

    async def discovered(self) -> dict[str, Discovered]:
        """Every destination's advertisement held."""
        await self.ensure_schema()
        return await self._api.run_db_interaction(
            "synapse_relay_discovered", _discovered_txn, None
        )

    async def discovered_for(self, destination: str) -> Discovered | None:
        await self.ensure_schema()
        found = await self._api.run_db_interaction(
            "synapse_relay_discovered_for", _discovered_txn, destination
        )
        return found.get(destination)

    async def keep_advertisement(
        self, advertisement: Advertisement, signed_json: str, fetched_ms: int
    ) -> bool:
        """Store `advertisement` unless an advertisement with a newer `ts` is held
        (one with the same `ts` only gets its `fetched_ts` updated); whether it is
        now the one held."""
        await self.ensure_schema()
        return await self._api.run_db_interaction(
            "synapse_relay_keep_advertisement",
            _keep_advertisement_txn,
            advertisement,
            signed_json,
            fetched_ms,
        )

    async def forget_discovered(self, destination: str) -> bool:
        """Forget the advertisement of `destination`; whether one was held."""
        await self.ensure_schema()
        return await self._api.run_db_interaction(
            "synapse_relay_forget_discovered", _forget_discovered_txn, destination
        )

    async def register(self, server_name: str, now_ms: int) -> None:
        """Record that `server_name` proved who it is (collected) at `now_ms`."""
        await self.ensure_schema()
        await self._api.run_db_interaction(
            "synapse_relay_register", _register_txn, server_name, now_ms
        )

    async def registered(self, since_ms: int) -> dict[str, int]:
        """Servers registered at or after `since_ms`, with when they last did."""
        await self.ensure_schema()
        return await self._api.run_db_interaction(
            "synapse_relay_registered", _registered_txn, None, since_ms
        )

    async def registered_at(self, server_name: str, since_ms: int) -> int | None:
        """When `server_name` last registered, if at or after `since_ms`."""
        await self.ensure_schema()
        found = await self._api.run_db_interaction(
            "synapse_relay_registered_at", _registered_txn, server_name, since_ms
        )
        return found.get(server_name)


def _send_relays_txn(txn: LoggingTransaction) -> dict[str, tuple[str, ...]]:
    txn.execute("SELECT destination, relays FROM synapse_relay_send_relays")
    return {destination: _relay_list(relays) for destination, relays in txn.fetchall()}


def _send_relays_for_txn(
    txn: LoggingTransaction, destination: str
) -> tuple[str, ...] | None:
    txn.execute(
        "SELECT relays FROM synapse_relay_send_relays WHERE destination = ?",
        (destination,),
    )
    row = txn.fetchone()
    return None if row is None else _relay_list(row[0])


def _set_send_relays_txn(
    txn: LoggingTransaction, destination: str, relays_json: str
) -> None:
    txn.execute(
        "INSERT INTO synapse_relay_send_relays (destination, relays) VALUES (?, ?)"
        " ON CONFLICT (destination) DO UPDATE SET relays = excluded.relays",
        (destination, relays_json),
    )


def _delete_send_relays_txn(txn: LoggingTransaction, destination: str) -> bool:
    txn.execute(
        "DELETE FROM synapse_relay_send_relays WHERE destination = ?", (destination,)
    )
    return bool(txn.rowcount)


def _relay_list(relays_json: str) -> tuple[str, ...]:
    return tuple(str(relay) for relay in json.loads(relays_json))


def _discovered_txn(
    txn: LoggingTransaction, destination: str | None
) -> dict[str, Discovered]:
    sql = (
        "SELECT destination, relays, ts, valid_until_ts, fetched_ts"
        " FROM synapse_relay_discovered"
    )
    if destination is None:
        txn.execute(sql)
    else:
        txn.execute(sql + " WHERE destination = ?", (destination,))
    return {
        row[0]: Discovered(
            Advertisement(row[0], _relay_list(row[1]), row[2], row[3]), row[4]
        )
        for row in txn.fetchall()
    }


def _keep_advertisement_txn(
    txn: LoggingTransaction,
    advertisement: Advertisement,
    signed_json: str,
    fetched_ms: int,
) -> bool:
    txn.execute(
        "INSERT INTO synapse_relay_discovered"
        " (destination, relays, ts, valid_until_ts, fetched_ts, advertisement)"
        " VALUES (?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (destination) DO UPDATE SET"
        " relays = excluded.relays, ts = excluded.ts,"
        " valid_until_ts = excluded.valid_until_ts,"
        " fetched_ts = excluded.fetched_ts, advertisement = excluded.advertisement"
        " WHERE excluded.ts >= synapse_relay_discovered.ts",
        (
            advertisement.destination,
            json.dumps(list(advertisement.relays)),
            advertisement.ts,
            advertisement.valid_until_ts,
            fetched_ms,
            signed_json,
        ),
    )
    return bool(txn.rowcount)


def _forget_discovered_txn(txn: LoggingTransaction, destination: str) -> bool:
    txn.execute(
        "DELETE FROM synapse_relay_discovered WHERE destination = ?", (destination,)
    )
    return bool(txn.rowcount)


def _register_txn(txn: LoggingTransaction, server_name: str, now_ms: int) -> None:
    txn.execute(
        "INSERT INTO synapse_relay_registered (server_name, last_collect_ts)"
        " VALUES (?, ?) ON CONFLICT (server_name) DO UPDATE SET"
        " last_collect_ts = excluded.last_collect_ts",
        (server_name, now_ms),
    )


def _registered_txn(
    txn: LoggingTransaction, server_name: str | None, since_ms: int
) -> dict[str, int]:
    sql = (
        "SELECT server_name, last_collect_ts FROM synapse_relay_registered"
        " WHERE last_collect_ts >= ?"
    )
    if server_name is None:
        txn.execute(sql + " ORDER BY server_name", (since_ms,))
    else:
        txn.execute(sql + " AND server_name = ?", (since_ms, server_name))
    return dict(txn.fetchall())
