"""Our mailbox on one relay, in either wire form of collection (the receive role's
client side; the collector, `collector.py`, handles what it hands out).

- *batch collect* (DESIGN.md section 2b, `POST /_matrix/federation/unstable/
  synapse_relay/collect/@_relay:<us>`): every request acknowledges the entries
  processed since the last one and returns up to `BATCH_LIMIT` more. It *fetches
  ahead*: when the collector takes the last entry in hand, the next batch is
  already requested (acknowledging everything processed before it), so that the
  relay's answer travels while Synapse processes that entry. The relay returns
  the entries handed out and not acknowledged yet again (in hand, or fed and not
  processed yet): they are skipped, and counted in the request's limit.
- *relay_txn* (section 2, Dendrite's API): one entry per request, acknowledging
  the previous one. No fetching ahead: the relay hands out the oldest entry until
  it is acknowledged.

A relay that answers the batch request 400 or 404 `M_UNRECOGNIZED` has no batch
endpoint (Dendrite, or an older synapse-relay): the mailbox switches to relay_txn
at once and says so (`lacks_batch`), and the collector keeps using relay_txn with
that relay for `BATCH_RECHECK_MS`.

Entries are handed out in the relay's order, one at a time; the collector says
which ones it is done with (`done`), and only those are ever acknowledged.
"""

import logging
from collections import deque
from typing import Any, Protocol

from synapse.module_api import JsonDict, make_deferred_yieldable, run_in_background
from twisted.internet import defer

from synapse_relay._synapse.inbound import RelayRequestFailed
from synapse_relay.inbound import (
    MalformedAnswer,
    RelayEntry,
    parse_batch_answer,
    parse_relay_answer,
)
from synapse_relay.protocol import COLLECT_MAX_LIMIT, collect_path, relay_txn_path

logger = logging.getLogger(__name__)

RELAY_TIMEOUT_MS = 30_000
# Entries asked for per batch request (the relay may return fewer: size budget).
BATCH_LIMIT = 25
# How long a relay found without the batch endpoint is collected from with
# relay_txn before the batch endpoint is tried again (it may have been upgraded).
BATCH_RECHECK_MS = 60 * 60 * 1000


class RelayWire(Protocol):
    """The two signed federation requests of collection (`InboundFederation`)."""

    server_name: str

    async def get_with_body(
        self, destination: str, path: str, content: JsonDict, timeout_ms: int
    ) -> Any: ...

    async def post_json(
        self, destination: str, path: str, content: JsonDict, timeout_ms: int
    ) -> Any: ...


class HandedOutAgain(Exception):
    """The relay handed out an entry again after we acknowledged it."""


def lacks_batch_endpoint(error: RelayRequestFailed) -> bool:
    """Whether a batch request's failure says the relay has no such endpoint."""
    return error.code in (400, 404) and error.errcode == "M_UNRECOGNIZED"


class RelayMailbox:
    """Our mail on `relay` during one collection.

    `acknowledge`: entries processed earlier whose acknowledgement may not have
    reached the relay; they are acknowledged first. `batch`: whether to try the
    batch endpoint. After a failure, `unacknowledged` is what to acknowledge
    on the next collection.
    """

    def __init__(
        self, wire: RelayWire, relay: str, acknowledge: list[int], batch: bool
    ) -> None:
        self._wire = wire
        self._relay = relay
        self.batch = batch
        self.lacks_batch = False
        # entries fetched and not handed out yet, in order
        self._pending: deque[RelayEntry] = deque()
        # entries done with whose acknowledgement the relay has not confirmed
        self._acks: list[int] = list(acknowledge)
        # ids handed out in this collection; those the relay confirmed deleting
        self._seen: set[int] = set()
        self._acknowledged: set[int] = set()
        # whether asking again may bring more entries (until the relay says no)
        self._more = True
        # the batch request fetching ahead, under way
        self._ahead: defer.Deferred[Exception | None] | None = None

    @property
    def wire_form(self) -> str:
        return "batch collect" if self.batch else "relay_txn"

    @property
    def unacknowledged(self) -> list[int]:
        return list(self._acks)

    def done(self, entry_id: int) -> None:
        """The collector is done with this entry (processed, or rejected for good):
        acknowledge it with the next request."""
        self._acks.append(entry_id)

    async def next(self) -> RelayEntry | None:
        """The next entry, None when the mailbox is empty and everything handed
        out is acknowledged. Raises RelayRequestFailed, MalformedAnswer or
        HandedOutAgain."""
        while not self._pending:
            if self._ahead is not None:
                ahead, self._ahead = self._ahead, None
                outcome = await make_deferred_yieldable(ahead)
                if isinstance(outcome, Exception):
                    raise outcome
            elif self._more or self._acks:
                await self._fetch(ahead=False)
            else:
                return None
        entry = self._pending.popleft()
        if self.batch and not self._pending and self._more:
            self._ahead = run_in_background(self._fetch_ahead)
        return entry

    async def _fetch_ahead(self) -> Exception | None:
        """Fetch the next batch while the last entry in hand is processed; what
        went wrong is raised by `next`, which awaits it."""
        try:
            await self._fetch(ahead=True)
        except (RelayRequestFailed, MalformedAnswer, HandedOutAgain) as e:
            return e
        return None

    async def _fetch(self, ahead: bool) -> None:
        if self.batch:
            try:
                await self._fetch_batch()
                return
            except RelayRequestFailed as e:
                if not lacks_batch_endpoint(e):
                    raise
                logger.info(
                    "Relay %s has no batch collect endpoint (%s): collecting with"
                    " relay_txn",
                    self._relay,
                    e.reason,
                )
                self.batch = False
                self.lacks_batch = True
                if ahead:
                    return  # `next` fetches with relay_txn once the entry is done
        await self._fetch_relay_txn()

    async def _fetch_batch(self) -> None:
        sent = list(self._acks)
        # The entries handed out or fetched and not acknowledged (in hand, fed
        # and not processed yet) come back first: ask for that many more.
        outstanding = len(self._seen - self._acknowledged - set(sent))
        limit = min(BATCH_LIMIT + outstanding, COLLECT_MAX_LIMIT)
        answer = await self._wire.post_json(
            self._relay,
            collect_path(self._wire.server_name),
            {"acknowledge": sent, "limit": limit},
            RELAY_TIMEOUT_MS,
        )
        entries, more = parse_batch_answer(answer)
        self._confirmed(sent)
        new = [self._take(entry) for entry in entries]
        # Nothing new (the relay's size budget, or only entries not acknowledged
        # yet): ask again only once more entries are acknowledged.
        self._more = more and any(new)

    async def _fetch_relay_txn(self) -> None:
        # relay_txn acknowledges one entry per request
        sent = self._acks[:1]
        answer = await self._wire.get_with_body(
            self._relay,
            relay_txn_path(self._wire.server_name),
            {"entry_id": sent[0] if sent else 0},
            RELAY_TIMEOUT_MS,
        )
        entry = parse_relay_answer(answer)
        self._confirmed(sent)
        self._more = entry is not None and self._take(entry)

    def _confirmed(self, sent: list[int]) -> None:
        """The relay answered a request acknowledging `sent`."""
        self._acknowledged.update(sent)
        confirmed = set(sent)
        self._acks = [a for a in self._acks if a not in confirmed]

    def _take(self, entry: RelayEntry) -> bool:
        """Queue an entry the relay handed out; whether it is new."""
        if entry.entry_id in self._acknowledged:
            raise HandedOutAgain(
                f"the relay handed out entry {entry.entry_id} again after we"
                " acknowledged it"
            )
        if entry.entry_id in self._seen:
            return False  # in hand, or done with and not acknowledged yet
        self._seen.add(entry.entry_id)
        self._pending.append(entry)
        return True
