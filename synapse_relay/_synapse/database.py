"""Synapse's database layer, where the module API's `run_db_interaction` falls short.

- `LoggingTransaction` (synapse/storage/database.py) is what `run_db_interaction`
  hands a function: the store's functions are typed with it.
- `run_read_committed`: `run_db_interaction` always runs at Synapse's default
  isolation on PostgreSQL, REPEATABLE READ, where two processes (workers) updating
  the same row fail one with a serialization error. At READ COMMITTED an `UPDATE`
  (or `INSERT ... ON CONFLICT DO UPDATE`) of a row another transaction holds waits
  for it and then proceeds on the committed row: no serialization failure.
"""

from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar

from synapse.module_api import ModuleApi

# synapse/storage/database.py: the cursor wrapper handed to interactions.
from synapse.storage.database import LoggingTransaction

# synapse/storage/engines/_base.py: the isolation levels `runInteraction` takes.
from synapse.storage.engines._base import IsolationLevel

__all__ = ["READ_COMMITTED", "LoggingTransaction", "run_read_committed"]

READ_COMMITTED = IsolationLevel.READ_COMMITTED

P = ParamSpec("P")
R = TypeVar("R")


async def run_read_committed(
    api: ModuleApi,
    desc: str,
    func: Callable[Concatenate[LoggingTransaction, P], R],
    *args: P.args,
    **kwargs: P.kwargs,
) -> R:
    """`api.run_db_interaction`, at READ COMMITTED on PostgreSQL (SQLite has one
    writer at a time and ignores the level).

    synapse/storage/database.py: `DatabasePool.runInteraction(desc, func, *args,
    isolation_level=...)` sets the level on the connection for this transaction
    only (`engine.attempt_to_set_isolation_level`) and still retries the whole
    function on deadlocks, so `func` must stay free of side effects;
    synapse/module_api/__init__.py: `ModuleApi._store` is the main data store,
    whose `db_pool` `run_db_interaction` itself uses.
    """

    def interaction(txn: LoggingTransaction) -> R:
        return func(txn, *args, **kwargs)

    return await api._store.db_pool.runInteraction(
        desc, interaction, isolation_level=READ_COMMITTED
    )
