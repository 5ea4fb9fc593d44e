"""The receive role's window on Synapse's inbound staging area: how many PDUs the
collector has fed that Synapse has not processed yet.

Synapse answers a fed transaction once its PDUs are *staged*
(`federation_inbound_events_staging`) and processes them in the background, room
by room in the order they were staged, as for a transaction received directly. So
the collector feeds the next transaction while Synapse still processes the
previous ones, as a direct sender does, but keeps at most `STAGING_WINDOW` fed PDUs
unprocessed: Synapse prunes a room's staging area down to its forward extremities
once it holds 100 events (`prune_staged_events_in_room`), and would then ask the
(offline) origin for the pruned events. An entry is *done* (and acknowledged) only
once all its PDUs left the staging area: persisted, or rejected.
"""

from collections.abc import Callable, Collection, Sequence
from typing import Protocol

import attr
from synapse.module_api import ModuleApi

# PDUs fed and not yet processed, at most: half of Synapse's pruning threshold of
# a room's staging area, and one full transaction (50 PDUs) always fits.
STAGING_WINDOW = 50
# How long Synapse may take to process the PDUs of one fed transaction.
PROCESSING_TIMEOUT_MS = 60_000
# While waiting for the fed PDUs to be processed (the last ones of a collection,
# or each one with relay_txn), the staging area is checked often at first (fed
# PDUs typically take 10-30 ms; each check is one indexed query), then less.
PROCESSING_POLL_MS = (2,) * 15 + (10, 20, 50, 100, 200, 500)
# While waiting for room in a full window, it is checked this often: Synapse has
# plenty queued then, and checking more often only takes database time from it
# (on SQLite, its one connection).
ROOM_POLL_MS = (50,)
# While fed PDUs wait this long in Synapse's staging area, and as often again,
# Synapse is asked to process its staging area (PDUs left there by a processing
# that failed, our database being down, would otherwise wait for Synapse's
# once-a-minute retry).
PROCESS_STAGED_AFTER_MS = 1_000


class StagingArea(Protocol):
    async def still_staged(
        self, origin: str, event_ids: Collection[str]
    ) -> set[str]: ...

    async def process_staged(self) -> None: ...


class StagingStuck(Exception):
    """Synapse's staging area cannot be checked or processed (`database`: our
    database failing, probably), or does not drain in time."""

    def __init__(self, reason: str, database: bool) -> None:
        super().__init__(reason)
        self.database = database


@attr.s(auto_attribs=True)
class _Fed:
    entry_id: int
    origin: str
    staged: set[str]
    fed_ms: int


class StagingWindow:
    """The entries fed during one collection whose PDUs are still staged.

    `on_done(entry_id)` is called for each entry once its PDUs are processed (at
    once for an entry without staged PDUs).
    """

    def __init__(
        self, staging: StagingArea, api: ModuleApi, on_done: Callable[[int], None]
    ) -> None:
        self._staging = staging
        self._api = api
        self._on_done = on_done
        self._fed: list[_Fed] = []

    @property
    def empty(self) -> bool:
        return not self._fed

    def add(self, entry_id: int, origin: str, staged: Collection[str]) -> None:
        """Entry `entry_id` was fed: `staged` are its PDUs Synapse staged."""
        if not staged:
            self._on_done(entry_id)
            return
        now = self._api.get_current_time_msec()
        self._fed.append(_Fed(entry_id, origin, set(staged), now))

    async def make_room(self, pdus: int) -> None:
        """Wait until `pdus` more PDUs fit in the window. Raises StagingStuck.

        The staging area is checked once anyway (one indexed query per fed
        transaction), so that processed entries are acknowledged with the next
        request to the relay, which then does not hand them out again."""
        if self._fed:
            await self._check()
        await self._wait_until(
            lambda: self._staged() + pdus <= STAGING_WINDOW, ROOM_POLL_MS
        )

    async def drain(self) -> None:
        """Wait until every fed entry is processed. Raises StagingStuck."""
        if self._fed:
            await self._check()
        await self._wait_until(lambda: not self._fed, PROCESSING_POLL_MS)

    def _staged(self) -> int:
        return sum(len(fed.staged) for fed in self._fed)

    async def _wait_until(
        self, condition: Callable[[], bool], polls_ms: Sequence[int]
    ) -> None:
        attempt = 0
        waited_ms = 0
        next_kick_ms = PROCESS_STAGED_AFTER_MS
        while not condition():
            if waited_ms >= next_kick_ms:
                next_kick_ms += PROCESS_STAGED_AFTER_MS
                try:
                    await self._staging.process_staged()
                except Exception as e:
                    raise StagingStuck(
                        f"processing Synapse's staging area failed: {e!r}", True
                    ) from e
            delay = polls_ms[min(attempt, len(polls_ms) - 1)]
            attempt += 1
            await self._api.sleep(delay / 1000)
            waited_ms += delay
            await self._check()

    async def _check(self) -> None:
        """Forget the PDUs that left the staging area; finish entries whose PDUs
        all did."""
        for origin in {fed.origin for fed in self._fed}:
            mine = [fed for fed in self._fed if fed.origin == origin]
            try:
                staged = await self._staging.still_staged(
                    origin, set().union(*(fed.staged for fed in mine))
                )
            except Exception as e:
                raise StagingStuck(
                    f"checking Synapse's staging area failed: {e!r}", True
                ) from e
            for fed in mine:
                fed.staged &= staged
        now = self._api.get_current_time_msec()
        for fed in list(self._fed):
            if not fed.staged:
                self._fed.remove(fed)
                self._on_done(fed.entry_id)
            elif now - fed.fed_ms >= PROCESSING_TIMEOUT_MS:
                raise StagingStuck(
                    f"Synapse has not processed {len(fed.staged)} PDUs of entry"
                    f" {fed.entry_id} after {now - fed.fed_ms} ms",
                    False,
                )
