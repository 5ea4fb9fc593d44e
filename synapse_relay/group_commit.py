"""Group commit: many concurrent callers, one database transaction for all of them.

`GroupCommit.submit(item)` waits until `item` is committed and returns its own
result. The first caller starts a commit of everything pending; callers arriving
while it runs wait for the next one, which takes all of them (at most `max_batch`),
and so on. Under load one transaction (one round trip through Synapse's database
pool, one fsync on SQLite) serves many requests; alone, a caller waits for nothing.

The commit function returns one result per item, in order: an exception in that
list is raised to that item's caller only (a quota refusal does not fail the
others); an exception raised by the commit function fails the whole batch.
"""

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from synapse.module_api import ModuleApi, make_deferred_yieldable
from twisted.internet import defer

from synapse_relay._synapse import fire_in_sentinel_context

logger = logging.getLogger(__name__)

I = TypeVar("I")  # noqa: E741
R = TypeVar("R")


class GroupCommit(Generic[I, R]):
    def __init__(
        self,
        api: ModuleApi,
        desc: str,
        commit: Callable[[Sequence[I]], Awaitable[Sequence["R | Exception"]]],
        max_batch: int,
    ) -> None:
        self._api = api
        self._desc = desc
        self._commit = commit
        self._max_batch = max_batch
        self._pending: list[tuple[I, defer.Deferred[R | Exception]]] = []
        self._running = False

    async def submit(self, item: I) -> R:
        waiter: defer.Deferred[R | Exception] = defer.Deferred()
        self._pending.append((item, waiter))
        if not self._running:
            self._running = True
            # Its own logcontext: the loop outlives the request that started it.
            self._api.run_as_background_process(
                self._desc, self._commit_while_pending, bg_start_span=False
            )
        result = await make_deferred_yieldable(waiter)
        if isinstance(result, Exception):
            raise result
        return result

    async def _commit_while_pending(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                outcomes: Sequence[R | Exception]
                try:
                    outcomes = await self._commit([item for item, _ in batch])
                    if len(outcomes) != len(batch):
                        raise RuntimeError(
                            f"{self._desc}: {len(outcomes)} results for"
                            f" {len(batch)} items"
                        )
                except Exception as e:  # every caller of the batch gets it
                    outcomes = [e] * len(batch)
                for (_, waiter), outcome in zip(batch, outcomes, strict=True):
                    if not waiter.called:  # (a cancelled caller's is)
                        fire_in_sentinel_context([waiter], outcome)
        finally:
            self._running = False
