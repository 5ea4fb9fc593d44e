"""The relay role's pusher: delivers proven entries to their destination itself.

An entry deposited with an origin proof (DESIGN.md section 2b) holds everything
needed to replay the origin's own `PUT /_matrix/federation/v1/send/{txnID}`: the
transaction T as the origin signed it, and the signature, from which the X-Matrix
header is rebuilt. The destination takes it as a request from the origin, so it
needs no module: this is what makes a sender-side relay useful to any server.

How a destination's proven entries go (`Pusher`, one destination at a time per
coroutine, on the one instance that runs background tasks, so that two processes
never push the same entry):

1. A destination with proven entries queued is *probed* (`GET /_matrix/federation/
   v1/version`, ignoring and not feeding Synapse's own backoff of it). Any answer
   means it is up. No answer: probed again after 1 s, doubling, at most
   `relay.push_interval_max` (1 minute by default).
2. Once it answers, its proven entries are pushed at once, serially, oldest first,
   one transaction at a time. A 200 deletes the entry, as its owner's
   acknowledgement would (the same store function: quotas stay exact).
3. Any other outcome keeps the entry (for collection, or a later push) and backs
   off, the pushing of this destination resuming with the same entry:
   - no answer, a timeout, 429 or 5xx: probe again after the backoff;
   - 401: push again after the backoff. The destination usually cannot obtain a
     key of the origin valid now (it has been offline longer than the key
     validity the origin published, a day on Synapse) and will once the origin
     is back, or a notary has a fresh key. Logged at warning, once per streak;
   - any other error (400, 403, 404...): the destination refuses the transaction
     for a reason a retry soon will not change; retried at `push_interval_max`,
     logged at warning once per streak.

Unproven entries (from senders without proofs, such as Dendrite) are never pushed:
they are left for collection by their owner, until retention. Pushing them would
mean a `/send` signed by the relay, of which a plain Synapse keeps only the PDUs
(every EDU whose sender is not on the origin is dropped: to-device messages,
carrying room keys, would be lost once the entry is deleted), checking the
relay's server ACLs and fetching missing events from the relay. The proven entries
of a destination are pushed in entry order past its unproven ones: a sender
proves all of its deposits or none, so the order per origin is kept.

Owners that collect are pushed to as well: a push usually reaches them sooner
than their next collection, and receiving a transaction both ways is harmless,
since Synapse deduplicates transactions by (origin, transaction id) and the
receive role feeds a proven transaction under the origin's transaction id.

New proven deposits wake their destination's pusher on this process; deposits
received by another worker are found by a scan every `SCAN_INTERVAL_MS`.
Traffic: one probe per backoff step per destination that has proven entries and
does not answer, that is about ten in the first two minutes, then one per
`push_interval_max`, for as long as the entries are kept (`relay.retention`).
"""

import enum
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import attr
from synapse.module_api import ModuleApi

from synapse_relay._synapse.outbound import (
    Answer,
    DeliveryError,
    Denied,
    OutboundFederation,
    Rejected,
)
from synapse_relay.config import RelayConfig
from synapse_relay.proof import OriginProof, parse_proof, send_uri
from synapse_relay.stats import RoleStats
from synapse_relay.store import Entry, RelayStore

logger = logging.getLogger(__name__)

# First delay after a failure; it doubles with each failure in a row, up to the
# configured `push_interval_max`.
FIRST_RETRY_DELAY_MS = 1_000
# Timeout of a probe; of a push (the destination processes the transaction before
# answering, and may have to fetch the origin's keys first).
PROBE_TIMEOUT_MS = 5_000
PUSH_TIMEOUT_MS = 60_000
# How often the database is scanned for destinations with proven entries that this
# process was not woken for (deposits received by other workers, or before start).
SCAN_INTERVAL_MS = 5_000

# Prometheus: synapse_relay_push_<name>_total
PUSH_COUNTERS = {
    "probes": "Probes of destinations that have proven entries queued",
    "attempted": "Proven entries replayed to their destination",
    "delivered": "Pushed entries their destination accepted (deleted)",
    "failed": "Pushes without an answer, or answered 429 or 5xx (kept)",
    "unauthorized": "Pushes answered 401, typically: the destination has no key of"
    " the origin valid now (kept)",
    "rejected": "Pushes answered another error such as 400 or 403 (kept)",
}


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    # no answer, a timeout, 429 or 5xx: probe before pushing again
    UNREACHABLE = "unreachable"
    # 401: the destination answers but does not accept the origin's signature now
    UNAUTHORIZED = "unauthorized"
    # any other error: a retry soon would not change it
    REJECTED = "rejected"


_COUNTER_OF = {
    Outcome.DELIVERED: "delivered",
    Outcome.UNREACHABLE: "failed",
    Outcome.UNAUTHORIZED: "unauthorized",
    Outcome.REJECTED: "rejected",
}


def outcome_of(code: int) -> Outcome:
    """What a destination's answer to a pushed `/send` means."""
    if 200 <= code < 300:
        return Outcome.DELIVERED
    if code == 429 or code >= 500:
        return Outcome.UNREACHABLE
    if code == 401:
        return Outcome.UNAUTHORIZED
    return Outcome.REJECTED


def retry_delay_ms(previous_ms: int, outcome: Outcome, max_ms: int) -> int:
    """The delay before the next attempt after a failed one; `previous_ms` is the
    delay before the failed attempt (0 if it was not a retry)."""
    if outcome is Outcome.REJECTED:
        return max_ms
    if previous_ms <= 0:
        return min(FIRST_RETRY_DELAY_MS, max_ms)
    return min(previous_ms * 2, max_ms)


def x_matrix_authorization(origin: str, destination: str, proof: OriginProof) -> str:
    """The X-Matrix Authorization header of the origin's request, formatted as
    Synapse formats its own (MatrixFederationHttpClient.build_auth_headers)."""
    return (
        f'X-Matrix origin="{origin}",key="{proof.key}",sig="{proof.sig}",'
        f'destination="{destination}"'
    )


@attr.s(frozen=True, auto_attribs=True)
class Push:
    """A proven entry, as the request that replays it."""

    entry_id: int
    origin: str
    destination: str
    txn_id: str
    # the request path of the origin's direct `PUT /send`
    path: str
    body: bytes
    authorization: str

    @classmethod
    def of(cls, entry: Entry) -> "Push":
        """`entry` must be proven (stored with its origin's proof)."""
        assert entry.origin_auth is not None
        transaction = json.loads(entry.txn_json)
        origin, destination = transaction["origin"], transaction["destination"]
        txn_id = transaction["transaction_id"]
        return cls(
            entry_id=entry.entry_id,
            origin=origin,
            destination=destination,
            txn_id=txn_id,
            path=send_uri(txn_id),
            body=entry.txn_json.encode("utf-8"),
            authorization=x_matrix_authorization(
                origin, destination, parse_proof(json.loads(entry.origin_auth))
            ),
        )


@attr.s(auto_attribs=True)
class DestinationState:
    """Where the pushing of one destination stands."""

    # the delay before the next attempt, 0 when none failed
    delay_ms: int = 0
    # when the next attempt is due (ms), while one is scheduled
    due_ms: int | None = None
    # probe before pushing: nothing answered last time (a destination starts so:
    # a deposit is usually made because its origin could not reach it)
    probe_first: bool = True
    # the outcome of the last failed attempt, None after a success
    failure: Outcome | None = None
    running: bool = False
    # a deposit arrived while running: look for entries once more before idling
    woken: bool = False

    def failed(self, outcome: Outcome, now_ms: int, max_ms: int) -> bool:
        """Record a failed attempt and schedule the next one; whether it starts a
        streak of this outcome (the moment to log it)."""
        new_streak = self.failure is not outcome
        self.failure = outcome
        self.probe_first = outcome is Outcome.UNREACHABLE
        self.delay_ms = retry_delay_ms(self.delay_ms, outcome, max_ms)
        self.due_ms = now_ms + self.delay_ms
        return new_streak

    def succeeded(self) -> None:
        self.failure = None
        self.probe_first = False
        self.delay_ms = 0

    def snapshot(self) -> dict[str, object]:
        return {
            "state": self.failure.value if self.failure else "pushing",
            "retry_delay_ms": self.delay_ms,
            "next_attempt_ts": self.due_ms,
        }


class PushStore(Protocol):
    """What the pusher reads from the relay's queues (`RelayStore`)."""

    async def oldest_proven_entry(self, destination: str) -> Entry | None: ...

    async def destinations_with_proven_entries(self) -> list[str]: ...


class PushFederation(Protocol):
    """What the pusher needs from Synapse's federation client."""

    async def probe(
        self, destination: str, *, timeout_ms: int, ignore_backoff: bool
    ) -> None: ...

    async def replay_send(
        self,
        destination: str,
        path: str,
        body: bytes,
        authorization: str,
        *,
        timeout_ms: int,
    ) -> Answer: ...


class PushStats(RoleStats):
    """The pusher's counters, and in the admin `status` each destination it is
    pushing to or waiting for."""

    def __init__(self, states: dict[str, DestinationState]) -> None:
        super().__init__("push", PUSH_COUNTERS, per_relay=False)
        self._states = states

    def snapshot(self) -> dict[str, object]:
        result = super().snapshot()
        result["destinations"] = {
            destination: state.snapshot()
            for destination, state in sorted(self._states.items())
        }
        return result


class Pusher:
    def __init__(
        self,
        config: RelayConfig,
        store: PushStore,
        acknowledge: Callable[[str, int], Awaitable[bool]],
        federation: PushFederation,
        api: ModuleApi,
    ) -> None:
        """`acknowledge(destination, entry_id)` deletes a delivered entry as its
        owner's acknowledgement would."""
        self._max_ms = config.push_interval_max_ms
        self._store = store
        self._acknowledge = acknowledge
        self._federation = federation
        self._api = api
        self._states: dict[str, DestinationState] = {}
        self.stats = PushStats(self._states)

    def wake(self, destination: str) -> None:
        """`destination` has a new proven entry: start pushing to it unless that is
        under way or scheduled."""
        if destination == self._api.server_name:
            return
        state = self._states.get(destination)
        if state is None:
            self._states[destination] = DestinationState()
            self._api.run_as_background_process(
                "synapse_relay_push", self._run, destination
            )
        elif state.running:
            state.woken = True

    async def scan(self) -> None:
        """Wake every destination with proven entries (deposits another process
        received, entries left from before a restart)."""
        for destination in await self._store.destinations_with_proven_entries():
            self.wake(destination)

    async def _run(self, destination: str) -> None:
        state = self._states[destination]
        state.running, state.due_ms = True, None
        try:
            done = await self._push_queue(destination, state)
        except Exception:
            logger.exception("Pushing to %s failed", destination)
            state.failed(Outcome.UNREACHABLE, self._now(), self._max_ms)
            done = False
        finally:
            state.running = False
        if done:
            del self._states[destination]
            return
        assert state.due_ms is not None
        self._api.delayed_background_call(
            max(0, state.due_ms - self._now()),
            self._run,
            destination,
            desc="synapse_relay_push",
        )

    async def _push_queue(self, destination: str, state: DestinationState) -> bool:
        """Probe if needed, then push the destination's proven entries until none
        is left (True) or one failed (False, the next attempt scheduled)."""
        if state.probe_first and not await self._probe(destination, state):
            return False
        while True:
            state.woken = False
            entry = await self._store.oldest_proven_entry(destination)
            if entry is None:
                if state.woken:
                    continue
                return True
            push = Push.of(entry)
            outcome, detail = await self._push(push)
            self.stats.inc(_COUNTER_OF[outcome])
            if outcome is not Outcome.DELIVERED:
                if state.failed(outcome, self._now(), self._max_ms):
                    self._log_failure(push, outcome, detail, state.delay_ms)
                return False
            if state.failure is not None:
                logger.info("Pushing to %s succeeds again", destination)
            state.succeeded()
            await self._acknowledge(destination, push.entry_id)
            logger.info(
                "Pushed transaction %s from %s to %s (entry %d)",
                push.txn_id,
                push.origin,
                destination,
                push.entry_id,
            )

    async def _probe(self, destination: str, state: DestinationState) -> bool:
        """Whether the destination answers (any answer, an error too)."""
        self.stats.inc("probes")
        try:
            await self._federation.probe(
                destination, timeout_ms=PROBE_TIMEOUT_MS, ignore_backoff=True
            )
        except Rejected:
            pass
        except DeliveryError as e:
            if state.failed(Outcome.UNREACHABLE, self._now(), self._max_ms):
                logger.info(
                    "%s has proven entries queued and does not answer (%s): probing"
                    " it with a backoff of up to %d s",
                    destination,
                    e,
                    self._max_ms // 1000,
                )
            return False
        logger.info("%s answers: pushing its proven entries", destination)
        return True

    async def _push(self, push: Push) -> tuple[Outcome, str]:
        self.stats.inc("attempted")
        try:
            answer = await self._federation.replay_send(
                push.destination,
                push.path,
                push.body,
                push.authorization,
                timeout_ms=PUSH_TIMEOUT_MS,
            )
        except Denied as e:
            return Outcome.REJECTED, f"not in our federation_domain_whitelist ({e})"
        except DeliveryError as e:
            return Outcome.UNREACHABLE, str(e)
        detail = f"{answer.code} {answer.body[:200].decode('utf-8', 'replace')}"
        return outcome_of(answer.code), detail

    def _log_failure(
        self, push: Push, outcome: Outcome, detail: str, delay_ms: int
    ) -> None:
        what = (
            f"Push of transaction {push.txn_id} from {push.origin} to"
            f" {push.destination} (entry {push.entry_id}) failed: {detail}."
        )
        if outcome is Outcome.UNAUTHORIZED:
            logger.warning(
                "%s %s probably cannot obtain a key of %s valid now (%s has been"
                " offline longer than the validity of the key it published): the"
                " entries are kept, retried with a backoff of up to %d s",
                what,
                push.destination,
                push.origin,
                push.origin,
                self._max_ms // 1000,
            )
        elif outcome is Outcome.REJECTED:
            logger.warning(
                "%s The entries are kept (for collection), retried every %d s",
                what,
                delay_ms // 1000,
            )
        else:
            logger.info("%s Probing it again in %d ms", what, delay_ms)

    def _now(self) -> int:
        return self._api.get_current_time_msec()


def start_pusher(
    config: RelayConfig,
    store: RelayStore,
    acknowledge: Callable[[str, int], Awaitable[bool]],
    api: ModuleApi,
) -> Pusher | None:
    """The pusher, if `relay.push` is on and this process runs background tasks
    (only one process pushes)."""
    if not config.push or not api.should_run_background_tasks():
        return None
    pusher = Pusher(config, store, acknowledge, OutboundFederation(api), api)
    api.looping_background_call(
        pusher.scan, SCAN_INTERVAL_MS, desc="synapse_relay_push_scan"
    )
    logger.info(
        "Relay push enabled: proven entries are delivered to their destination when"
        " it answers (probes back off up to %d s)",
        config.push_interval_max_ms // 1000,
    )
    return pusher
