"""Everything the module keeps in Synapse's database: its tables, their schema
version, every SQL. One module per capability, each with its tables and the part
of `RelayStore` that uses them:

- `schema`: the schema version and migrations, made ready once per process
  (`SchemaStore`, which the others build on);
- `entries`: the relay queue (deposits in groups, collects and acknowledgements,
  purges, quotas, compressed storage);
- `relays`: the send role's relays per destination (admin API, discovery) and the
  relay role's registered servers;
- `keys`: the relay role's key mailbox (snapshots, escrowed one-time keys).

All SQL uses `?` placeholders, which Synapse rewrites for PostgreSQL, and runs
through `run_db_interaction` or `run_read_committed`, handed a
`LoggingTransaction`. Synapse retries these functions on deadlocks and (at
REPEATABLE READ, its default) serialization failures, so they have no side effects
beyond the database.
"""

from synapse_relay.store.entries import (
    Collected,
    CollectedBatch,
    Deposit,
    Entry,
    EntryStore,
    NewEntry,
    Queue,
    Quota,
    QuotaExceeded,
    stored_txn_json,
)
from synapse_relay.store.keys import EscrowedKey, KeyQuota, KeySnapshot, KeyStore, Stock
from synapse_relay.store.relays import Advertisement, Discovered, RelayListStore
from synapse_relay.store.schema import SCHEMA_VERSION, SchemaTooNew

__all__ = [
    "SCHEMA_VERSION",
    "Advertisement",
    "Collected",
    "CollectedBatch",
    "Deposit",
    "Discovered",
    "Entry",
    "EscrowedKey",
    "KeyQuota",
    "KeySnapshot",
    "NewEntry",
    "Queue",
    "Quota",
    "QuotaExceeded",
    "RelayStore",
    "SchemaTooNew",
    "Stock",
    "stored_txn_json",
]


class RelayStore(EntryStore, RelayListStore, KeyStore):
    """The module's one store, shared by its roles in a process."""
