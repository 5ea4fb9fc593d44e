"""The send role: the seed's P2P Node A.

When a destination that has relays cannot be reached directly, the transaction
Synapse built for it (same transaction id, PDUs, EDUs, origin) is *deposited* on
every relay of that destination, and Synapse is told it was sent as soon as one
relay accepted it. Destinations without relays are left entirely to Synapse.

How a transaction to a destination with relays goes (`Sender.send`):

1. Destination not known to be down: up to `attempts_before_relay` direct attempts,
   each with a `DIRECT_TIMEOUT_MS` timeout and none of Synapse's own retries, with
   short pauses between them (`retry_delay_ms`). The first attempt respects and
   feeds Synapse's backoff of the destination, the later ones are made despite it.
   A 2xx: sent. An error answer that is not 5xx or 429 (400, 401, 403...) is the
   destination speaking: it goes back to Synapse unchanged and is not relayed.
   Connection failures, timeouts, 5xx and 429 count as failed attempts; when all
   of them failed the destination is *down*. A destination that Synapse is already
   backing off from is tried all the same unless it is known to be down: after a
   restart, one that answers gets its traffic directly from the first transaction.
   When the attempts have had no answer for `DEPOSIT_AFTER_MS` (a destination that
   accepts TCP but never answers: a sleeping phone, a stale NAT mapping), the
   transaction is deposited *as well*, while the attempts go on (`_Race`): the
   first of the two to take it decides what Synapse is told. A slow but alive
   destination still gets it directly, and the copy on the relays is a harmless
   duplicate (events are deduplicated by id, proven transactions by the origin's
   transaction id). While those attempts go on without an answer, later
   transactions are deposited at once (and tried directly all the same). Only
   failed attempts make the destination down.
2. Destination down: straight to the relays, in parallel; the transaction counts as
   sent when the first relay answers 200, and the other deposits finish in the
   background. So a message sent while its destination is down is on a relay one
   round trip after Synapse sends it. Every deposit is the six-field transaction T
   with our origin proof (DESIGN.md 2b, `proof.py`), signed once per transaction:
   relays that keep it let every EDU cross; a relay that does not (Dendrite)
   ignores the unknown field. A relay refusing a proven deposit is treated as any
   refusal (no unproven retry: a relay of this module refuses only a proof that
   does not match or verify, which another attempt would not change).
3. No relay accepted it: Synapse's normal handling goes on (the events stay queued,
   and Synapse's backoff and catch-up apply as without this module); the
   destination's queue is woken again when the first relay is due for a retry.

Meanwhile a down destination is *probed* directly (`GET /_matrix/federation/v1/
version`) once per `PROBE_INTERVAL_MS`, in the background, never delaying a
transaction; a probe made while Synapse is not backing off from the destination
feeds that backoff, so that it grows as with Synapse's own retries. It is up again,
and direct delivery resumes, when a probe gets any answer, or when Synapse reports
it up (it sent us a signed request, or any request to it succeeded).

Synapse's backoff never keeps a transaction from a usable relay: the federation
sender is let through for destinations that have a relay not in its own retry
delay (`Sender.lets_through`). A relay that fails (no answer, or an error answer
including 507 quota) is skipped for `relay_retry_delay_ms(failures)` (1 s doubling
to 30 s); the others are not held up by it.

Everything Synapse-internal is in `_synapse/outbound.py`; the decisions here are
plain code with the clock passed in, unit-tested in tests/unit/test_sender.py.
"""

import enum
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol, cast

import attr
from synapse.module_api import JsonDict, ModuleApi, make_deferred_yieldable
from twisted.internet import defer

from synapse_relay._synapse import fire_in_sentinel_context
from synapse_relay._synapse.outbound import (
    BackedOff,
    DeliveryError,
    Denied,
    OutboundFederation,
    OutgoingTransaction,
    Rejected,
    Unreachable,
    bypass_backoff_for,
    intercept_outgoing_transactions,
    on_remote_server_up,
    sends_federation,
)
from synapse_relay.config import SendConfig
from synapse_relay.proof import OriginProof, signed_request, transaction_of
from synapse_relay.protocol import ORIGIN_AUTH, send_relay_path
from synapse_relay.stats import RoleStats
from synapse_relay.store import Discovered, RelayStore

logger = logging.getLogger(__name__)

# Timeout of one direct attempt of a transaction (Synapse's own is 60 s per attempt,
# with retries for about 9 minutes). Generous enough for a live server to process a
# transaction of 50 PDUs; a live server that is slower gets the transaction on the
# relays as well, which is harmless (events are deduplicated).
DIRECT_TIMEOUT_MS = 10_000
# Pause after the n-th failed direct attempt of a transaction: 100 ms doubling, at
# most 2 s (the default 3 attempts add 0.3 s before the first deposit).
RETRY_DELAY_BASE_MS = 100
RETRY_DELAY_MAX_MS = 2_000
# How long the direct attempts of a transaction may stay without any answer before
# it is deposited on the relays as well (the attempts go on): bounds the first
# message to a silent destination to about this plus one deposit, instead of
# attempts_before_relay x DIRECT_TIMEOUT_MS. A live server answers a transaction
# well within it (tens of ms), except under heavy load, when the copy on the relays
# is a harmless duplicate.
DEPOSIT_AFTER_MS = 1_000
# How often a down destination is probed directly, and the probe's timeout.
PROBE_INTERVAL_MS = 10_000
PROBE_TIMEOUT_MS = 5_000
# Timeout of one deposit on one relay (one database commit on the relay).
DEPOSIT_TIMEOUT_MS = 10_000
# After its n-th consecutive failure a relay is skipped for 1 s doubling, at most 30 s.
RELAY_RETRY_BASE_MS = 1_000
RELAY_RETRY_MAX_MS = 30_000
# How long relays set through the admin API may be cached: a change made on another
# worker is seen within this time (one on this process at once).
MAPPING_CACHE_MS = 5_000


TRANSACTION_COUNTERS = {
    "direct_failures": "Direct attempts of transactions to destinations that have"
    " relays that failed (connection, timeout, 5xx, 429)",
    "direct_rejected": "Transactions a destination that has relays answered with an"
    " error such as 400 or 403 (never relayed)",
    "fallbacks": "Transactions handed to the relays of their destination",
    "fallbacks_discovered": "Fallbacks to relays learnt from the destination's"
    " advertisement (discovery)",
    "early_deposits": "Transactions deposited because their direct attempts had no"
    " answer within DEPOSIT_AFTER_MS (the attempts went on)",
    "fallbacks_failed": "Transactions that no relay accepted (left to Synapse)",
    "probes": "Direct probes of destinations that are down",
    "recoveries": "Destinations that answer directly again after being down",
}
RELAY_COUNTERS = {
    "deposits_accepted": "Transactions a relay accepted",
    "deposits_refused": "Deposits a relay answered with an error (4xx, 5xx, 507 quota)",
    "deposits_failed": "Deposits that got no answer from the relay (connection,"
    " timeout)",
}


def retry_delay_ms(failed_attempt: int) -> int:
    """The pause after direct attempt number `failed_attempt` (from 1) failed."""
    return min(RETRY_DELAY_BASE_MS << (failed_attempt - 1), RETRY_DELAY_MAX_MS)


def relay_retry_delay_ms(failures: int) -> int:
    """How long a relay is skipped after `failures` (>= 1) failures in a row."""
    return min(RELAY_RETRY_BASE_MS << min(failures - 1, 16), RELAY_RETRY_MAX_MS)


class Reach(enum.Enum):
    UNKNOWN = "unknown"  # nothing learnt since this process started
    UP = "up"
    DOWN = "down"


@attr.s(auto_attribs=True)
class DestinationState:
    reach: Reach = Reach.UNKNOWN
    # when `reach` last changed, ms
    since_ms: int = 0
    # its answer to the last direct attempt was an error such as 400 or 403: Synapse
    # then backs off from it as without this module
    rejected: bool = False
    probe_scheduled: bool = False
    wake_scheduled: bool = False
    # the direct attempts of a transaction have had no answer for longer than
    # DEPOSIT_AFTER_MS, and have not ended yet: later transactions are deposited
    # at once (and tried directly all the same)
    silent: bool = False
    direct_failures: int = 0
    fallbacks: int = 0


class Destinations:
    """What the send role knows of each destination that has relays."""

    def __init__(self) -> None:
        self._states: dict[str, DestinationState] = {}

    def get(self, destination: str) -> DestinationState:
        state = self._states.get(destination)
        if state is None:
            state = self._states[destination] = DestinationState()
        return state

    def peek(self, destination: str) -> DestinationState | None:
        return self._states.get(destination)

    def is_down(self, destination: str) -> bool:
        state = self._states.get(destination)
        return state is not None and state.reach is Reach.DOWN

    def mark_down(self, destination: str, now_ms: int) -> bool:
        """Whether it was not already down."""
        state = self.get(destination)
        state.rejected = False
        if state.reach is Reach.DOWN:
            return False
        state.reach, state.since_ms = Reach.DOWN, now_ms
        return True

    def mark_up(self, destination: str, now_ms: int) -> bool:
        """Whether it was down."""
        state = self.get(destination)
        state.rejected = False
        was_down = state.reach is Reach.DOWN
        if state.reach is not Reach.UP:
            state.reach, state.since_ms = Reach.UP, now_ms
        return was_down

    def mark_rejected(self, destination: str, now_ms: int) -> None:
        self.mark_up(destination, now_ms)
        self.get(destination).rejected = True

    def forget(self, destination: str) -> None:
        self._states.pop(destination, None)

    def snapshot(self) -> dict[str, object]:
        return {
            destination: {
                "state": state.reach.value,
                "since_ts": state.since_ms or None,
                "direct_failures": state.direct_failures,
                "fallbacks": state.fallbacks,
            }
            for destination, state in sorted(self._states.items())
        }


@attr.s(auto_attribs=True)
class _RelayState:
    failures: int = 0
    retry_at_ms: int = 0


class RelayHealth:
    """Each relay's own retry delay after failed deposits."""

    def __init__(self) -> None:
        self._relays: dict[str, _RelayState] = {}

    def usable(self, relay: str, now_ms: int) -> bool:
        state = self._relays.get(relay)
        return state is None or state.retry_at_ms <= now_ms

    def failed(self, relay: str, now_ms: int) -> int:
        """Record a failure; how long the relay is now skipped for, ms."""
        state = self._relays.setdefault(relay, _RelayState())
        state.failures += 1
        delay = relay_retry_delay_ms(state.failures)
        state.retry_at_ms = now_ms + delay
        return delay

    def succeeded(self, relay: str) -> None:
        self._relays.pop(relay, None)

    def next_usable_ms(self, relays: Sequence[str], now_ms: int) -> int:
        """When the first of `relays` may be tried again (`now_ms` if one may now)."""
        return max(
            now_ms,
            min(
                (self._relays[r].retry_at_ms if r in self._relays else now_ms)
                for r in relays
            ),
        )


def usable_relays(
    destination: str, relays: Sequence[str], own_server_name: str
) -> tuple[str, ...]:
    """`relays` without duplicates, the destination itself or this server."""
    result: list[str] = []
    for relay in relays:
        if relay not in (destination, own_server_name) and relay not in result:
            result.append(relay)
    return tuple(result)


class Source(enum.Enum):
    """Where the relays of a destination come from, in order of precedence."""

    ADMIN = "admin"  # set through the admin API (database)
    CONFIG = "config"  # send.relays
    DISCOVERED = "discovered"  # the destination's advertisement (discovery.py)
    NONE = "none"


@attr.s(frozen=True, auto_attribs=True)
class RelaysOfDestination:
    """What relays a destination has, and where that comes from."""

    destination: str
    # the relays used, without the destination itself or this server
    relays: tuple[str, ...]
    source: Source
    config_relays: tuple[str, ...]
    # the destination's advertisement held, whether it is used or not
    discovered: Discovered | None


def choose_relays(
    destination: str,
    config: SendConfig,
    admin: tuple[str, ...] | None,
    discovered: Discovered | None,
    now_ms: int,
    own_server_name: str,
) -> RelaysOfDestination:
    """The one rule: the admin API's relays of `destination`, else `send.relays`,
    else (with `send.discover`) those of its advertisement while it is valid."""
    config_relays = tuple(config.relays.get(destination, ()))
    relays: Sequence[str]
    if admin is not None:
        relays, source = admin, Source.ADMIN
    elif destination in config.relays:
        relays, source = config_relays, Source.CONFIG
    elif (
        config.discover
        and discovered is not None
        and discovered.advertisement.valid_until_ts > now_ms
    ):
        relays, source = discovered.advertisement.relays, Source.DISCOVERED
    else:
        relays, source = (), Source.NONE
    return RelaysOfDestination(
        destination,
        usable_relays(destination, relays, own_server_name),
        source,
        config_relays,
        discovered,
    )


class RelayDirectory:
    """The relays of each destination (`choose_relays`), from the admin API's and
    the discovered ones in the database, and the configuration.

    The database is read at most once per `MAPPING_CACHE_MS` (one query for all
    destinations of each kind), so that a change made on any worker reaches the
    federation sender within that time; `invalidate` makes a change made on this
    process count at once, and `resolve(..., fresh=True)` reads the database now.
    """

    def __init__(
        self,
        config: SendConfig,
        store: RelayStore,
        clock_ms: Callable[[], int],
        own_server_name: str,
    ) -> None:
        self._config = config
        self._store = store
        self._clock_ms = clock_ms
        self._own_server_name = own_server_name
        self._admin: Mapping[str, tuple[str, ...]] | None = None
        self._discovered: Mapping[str, Discovered] = {}
        self._loaded_ms: int | None = None
        # Bumped by each invalidation: a read that began before one is stale and
        # must not be cached (it may predate the change that invalidated).
        self._generation = 0

    def invalidate(self) -> None:
        self._loaded_ms = None
        self._generation += 1

    async def relays_for(self, destination: str) -> tuple[str, ...]:
        return (await self.resolve(destination)).relays

    async def resolve(
        self, destination: str, fresh: bool = False
    ) -> RelaysOfDestination:
        if fresh:
            admin = await self._store.send_relays_for(destination)
            discovered = await self._store.discovered_for(destination)
        else:
            admin_relays, discovered_relays = await self._mappings()
            admin = admin_relays.get(destination)
            discovered = discovered_relays.get(destination)
        return choose_relays(
            destination,
            self._config,
            admin,
            discovered,
            self._clock_ms(),
            self._own_server_name,
        )

    async def everything(self) -> list[RelaysOfDestination]:
        """Every destination that has relays from any source or an advertisement
        held, read from the database now, sorted by destination."""
        admin = await self._store.send_relays()
        discovered = await self._store.discovered()
        now = self._clock_ms()
        return [
            choose_relays(
                destination,
                self._config,
                admin.get(destination),
                discovered.get(destination),
                now,
                self._own_server_name,
            )
            for destination in sorted({*admin, *self._config.relays, *discovered})
        ]

    async def _mappings(
        self,
    ) -> tuple[Mapping[str, tuple[str, ...]], Mapping[str, Discovered]]:
        now = self._clock_ms()
        generation = self._generation
        if self._admin is not None and self._loaded_ms is not None:
            if now - self._loaded_ms < MAPPING_CACHE_MS:
                return self._admin, self._discovered
            # Expired (not invalidated): callers meanwhile keep using the
            # mappings loaded before.
            self._loaded_ms = now
        try:
            admin = await self._store.send_relays()
            discovered = await self._store.discovered() if self._config.discover else {}
        except Exception as e:
            logger.warning(
                "Could not read the relays set through the admin API or discovered"
                " (%s): using %s",
                e,
                "the ones read before" if self._admin is not None else "the config",
            )
            return (self._admin or {}), self._discovered
        if generation == self._generation:
            self._admin, self._discovered, self._loaded_ms = admin, discovered, now
        return admin, discovered


class Federation(Protocol):
    """What the sender needs from Synapse's federation client (`OutboundFederation`)."""

    async def send_transaction(
        self, txn: OutgoingTransaction, *, timeout_ms: int, ignore_backoff: bool
    ) -> JsonDict: ...

    def sign(self, request: JsonDict) -> tuple[str, str]: ...

    async def deposit(
        self, relay: str, path: str, body: JsonDict, *, timeout_ms: int
    ) -> None: ...

    async def probe(
        self, destination: str, *, timeout_ms: int, ignore_backoff: bool
    ) -> None: ...

    def wake_destination(self, destination: str) -> None: ...

    async def failure_for_synapse(self, destination: str, reason: str) -> Exception: ...


class SendStats(RoleStats):
    """The send role's counters: deposits per relay (`RoleStats` per relay), and
    per-transaction counters that belong to no relay, plus each destination's state
    in the admin `status`."""

    def __init__(self, destinations: Destinations) -> None:
        super().__init__("send", RELAY_COUNTERS, per_relay=True)
        self._transactions = RoleStats("send", TRANSACTION_COUNTERS, per_relay=False)
        self._destinations = destinations

    def inc(self, name: str, relay: str | None = None, amount: int = 1) -> None:
        if name in TRANSACTION_COUNTERS:
            self._transactions.inc(name, amount=amount)
        else:
            super().inc(name, relay, amount)

    def snapshot(self) -> dict[str, object]:
        result = self._transactions.snapshot()
        result.update(super().snapshot())
        result["destinations"] = self._destinations.snapshot()
        return result


class Sender:
    def __init__(
        self,
        config: SendConfig,
        directory: RelayDirectory,
        federation: Federation,
        api: ModuleApi,
        on_delivered: Callable[[str], None] = lambda destination: None,
    ) -> None:
        """`on_delivered(destination)` is called after each transaction the
        destination itself accepted (it must be quick and never raise)."""
        self._config = config
        self.directory = directory
        self._federation = federation
        self._api = api
        self._on_delivered = on_delivered
        self.destinations = Destinations()
        self.relay_health = RelayHealth()
        self.stats = SendStats(self.destinations)

    def _now(self) -> int:
        return self._api.get_current_time_msec()

    async def send(
        self,
        txn: OutgoingTransaction,
        send_as_synapse: Callable[[], Awaitable[JsonDict]],
    ) -> JsonDict:
        """Send one transaction Synapse built; what the destination answered, or an
        empty answer when a relay took it. Raises what Synapse expects from a
        failure."""
        found = await self.directory.resolve(txn.destination)
        relays = found.relays
        if not relays:
            response = await send_as_synapse()
            self._on_delivered(txn.destination)
            return response

        if self.destinations.is_down(txn.destination):
            if await self._deposit(txn, found):
                return SENT_TO_RELAY
            raise await self._nobody_took_it(txn, relays, None)
        decision = await _Race(
            self._api,
            self.stats,
            txn,
            self.destinations.get(txn.destination),
            direct=lambda: self._direct_outcome(txn),
            deposit=lambda: self._deposit(txn, found),
        ).run()
        if decision.response is not None:
            return decision.response
        if decision.error is not None:
            raise decision.error
        raise await self._nobody_took_it(txn, relays, decision.direct_failure)

    async def _nobody_took_it(
        self,
        txn: OutgoingTransaction,
        relays: Sequence[str],
        direct_failure: Unreachable | None,
    ) -> Exception:
        """What to raise to Synapse when neither the destination nor a relay took
        the transaction; the queue is woken again when a relay may be retried."""
        destination = txn.destination
        self.stats.inc("fallbacks_failed")
        self._schedule_wake(destination, relays)
        if direct_failure is not None:
            return direct_failure.original
        return await self._federation.failure_for_synapse(
            destination,
            f"{destination} is down and none of its relays accepted transaction"
            f" {txn.transaction_id}",
        )

    async def _direct_outcome(self, txn: OutgoingTransaction) -> JsonDict | Exception:
        """`_send_directly`'s answer, or what it raised."""
        try:
            return await self._send_directly(txn)
        except Exception as e:
            return e

    async def _send_directly(self, txn: OutgoingTransaction) -> JsonDict:
        """Up to `attempts_before_relay` direct attempts.

        Raises Unreachable (all failed) or BackedOff (Synapse is backing off from a
        destination we know nothing better of) with the destination now down, or
        Synapse's own exception for any other failure.
        """
        destination = txn.destination
        attempts = self._config.attempts_before_relay
        state = self.destinations.get(destination)
        failure: Unreachable | None = None
        for attempt in range(1, attempts + 1):
            try:
                response = await self._attempt(txn, first=attempt == 1)
            except Rejected as e:
                self.destinations.mark_rejected(destination, self._now())
                self.stats.inc("direct_rejected")
                logger.info(
                    "Destination %s answered %s to transaction %s: not relaying it",
                    destination,
                    e.code,
                    txn.transaction_id,
                )
                raise e.original from None
            except Denied as e:
                raise e.original from None
            except BackedOff:
                logger.info(
                    "Synapse is backing off from destination %s: transaction %s"
                    " goes to its relays",
                    destination,
                    txn.transaction_id,
                )
                self._mark_down(destination)
                raise
            except Unreachable as e:
                failure = e
                state.direct_failures += 1
                self.stats.inc("direct_failures")
                logger.info(
                    "Direct attempt %d/%d of transaction %s to %s failed: %s",
                    attempt,
                    attempts,
                    txn.transaction_id,
                    destination,
                    e,
                )
                if attempt < attempts:
                    await self._api.sleep(retry_delay_ms(attempt) / 1000)
            else:
                if self.destinations.mark_up(destination, self._now()):
                    self._recovered(destination, "it answered a transaction")
                self._on_delivered(destination)
                return response
        assert failure is not None
        logger.info(
            "Destination %s is down after %d failed attempts of transaction %s:"
            " its transactions go to its relays",
            destination,
            attempts,
            txn.transaction_id,
        )
        self._mark_down(destination)
        raise failure

    async def _attempt(self, txn: OutgoingTransaction, first: bool) -> JsonDict:
        """One direct attempt. The first of a transaction respects and feeds
        Synapse's backoff (other requests to a dead server then back off as
        usual), except for a destination not known to be down: one that answered
        since Synapse started backing off from it, or that we know nothing of
        since this process started (after a restart, Synapse's backoff says only
        that it was down before: if it answers now, its traffic goes directly
        from the first transaction). The others are made despite the backoff."""
        if not first:
            return await self._federation.send_transaction(
                txn, timeout_ms=DIRECT_TIMEOUT_MS, ignore_backoff=True
            )
        try:
            return await self._federation.send_transaction(
                txn, timeout_ms=DIRECT_TIMEOUT_MS, ignore_backoff=False
            )
        except BackedOff:
            if self.destinations.is_down(txn.destination):
                raise
        return await self._federation.send_transaction(
            txn, timeout_ms=DIRECT_TIMEOUT_MS, ignore_backoff=True
        )

    async def _deposit(
        self, txn: OutgoingTransaction, found: RelaysOfDestination
    ) -> bool:
        """Deposit on every usable relay of `found` in parallel; whether one
        accepted it.

        Returns as soon as one relay accepted it: the other deposits go on in the
        background and are counted when they end.
        """
        destination = txn.destination
        relays = found.relays
        self.destinations.get(destination).fallbacks += 1
        self.stats.inc("fallbacks")
        if found.source is Source.DISCOVERED:
            self.stats.inc("fallbacks_discovered")
        now = self._now()
        usable = [r for r in relays if self.relay_health.usable(r, now)]
        if not usable:
            logger.warning(
                "Every relay of %s failed recently (%s): not depositing transaction"
                " %s before %d ms",
                destination,
                ", ".join(relays),
                txn.transaction_id,
                self.relay_health.next_usable_ms(relays, now) - now,
            )
            return False

        # T and its origin proof, signed once for every relay (DESIGN.md 2b).
        transaction = transaction_of(txn.body(), destination, txn.transaction_id)
        key, sig = self._federation.sign(signed_request(transaction))
        body = {**transaction, ORIGIN_AUTH: OriginProof(key, sig).to_json()}
        path = send_relay_path(txn.transaction_id, destination)
        outcome: defer.Deferred[bool] = defer.Deferred()
        remaining = len(usable)

        def ended(accepted: bool | None) -> None:
            nonlocal remaining
            remaining -= 1
            if outcome.called:
                return
            if accepted:
                outcome.callback(True)
            elif remaining == 0:
                outcome.callback(False)

        for relay in usable:
            self._api.run_as_background_process(
                "synapse_relay_deposit",
                self._deposit_on,
                relay,
                path,
                body,
                txn,
            ).addBoth(ended)
        return await make_deferred_yieldable(outcome)

    async def _deposit_on(
        self, relay: str, path: str, body: JsonDict, txn: OutgoingTransaction
    ) -> bool:
        """Deposit on one relay; whether it accepted. Never raises."""
        try:
            await self._federation.deposit(
                relay, path, body, timeout_ms=DEPOSIT_TIMEOUT_MS
            )
        except Exception as e:
            answered = isinstance(e, DeliveryError) and e.code is not None
            self.stats.inc("deposits_refused" if answered else "deposits_failed", relay)
            delay = self.relay_health.failed(relay, self._now())
            if isinstance(e, DeliveryError):
                logger.warning(
                    "Relay %s did not take transaction %s for %s: %s; retrying the"
                    " relay in %d ms",
                    relay,
                    txn.transaction_id,
                    txn.destination,
                    e,
                    delay,
                )
            else:
                logger.exception(
                    "Depositing transaction %s for %s on relay %s failed",
                    txn.transaction_id,
                    txn.destination,
                    relay,
                )
            return False
        self.relay_health.succeeded(relay)
        self.stats.inc("deposits_accepted", relay)
        logger.info(
            "Deposited transaction %s for %s on relay %s (%d PDUs, %d EDUs)",
            txn.transaction_id,
            txn.destination,
            relay,
            txn.pdu_count,
            txn.edu_count,
        )
        return True

    async def lets_through(self, destination: str) -> bool:
        """Whether Synapse's federation sender may queue and send to `destination`
        although Synapse is backing off from it: it has a relay that is not in its
        retry delay, and its last answer was not an error such as 403 (that is the
        destination speaking, which Synapse backs off from as usual)."""
        try:
            relays = await self.directory.relays_for(destination)
            if not relays:
                return False
            state = self.destinations.peek(destination)
            if state is not None and state.rejected:
                return False
            now = self._now()
            return any(self.relay_health.usable(relay, now) for relay in relays)
        except Exception:
            logger.exception("Could not tell whether %s has usable relays", destination)
            return False

    def remote_server_up(self, destination: str) -> None:
        """Synapse learnt that `destination` is up (it sent us a signed request, or a
        request to it succeeded after failures): direct delivery resumes."""
        try:
            if self.destinations.peek(destination) is None:
                return
            if self.destinations.mark_up(destination, self._now()):
                self._recovered(destination, "Synapse reports it up")
        except Exception:
            logger.exception("Could not mark %s up", destination)

    def mapping_changed(self, destination: str) -> None:
        """The admin API changed the relays of `destination` on this process."""
        self.directory.invalidate()

    def _recovered(self, destination: str, why: str) -> None:
        self.stats.inc("recoveries")
        logger.info(
            "Destination %s is reachable again (%s): direct delivery resumes",
            destination,
            why,
        )

    def _mark_down(self, destination: str) -> None:
        if self.destinations.mark_down(destination, self._now()):
            logger.info(
                "Destination %s is down: its transactions go to its relays; probing"
                " it directly every %d s",
                destination,
                PROBE_INTERVAL_MS // 1000,
            )
        self._schedule_probe(destination)

    def _schedule_probe(self, destination: str) -> None:
        state = self.destinations.get(destination)
        if state.probe_scheduled:
            return
        state.probe_scheduled = True
        self._api.delayed_background_call(
            PROBE_INTERVAL_MS, self._probe, destination, desc="synapse_relay_probe"
        )

    async def _probe(self, destination: str) -> None:
        state = self.destinations.get(destination)
        state.probe_scheduled = False
        if state.reach is not Reach.DOWN:
            return
        try:
            if not await self.directory.relays_for(destination):
                # No relays any more: Synapse alone is in charge again.
                self.destinations.forget(destination)
                return
            self.stats.inc("probes")
            await self._probe_once(destination)
        except Rejected:
            pass  # an answer all the same: it is up
        except Exception as e:
            logger.debug("Probe of %s failed: %s", destination, e)
            self._schedule_probe(destination)
            return
        if self.destinations.mark_up(destination, self._now()):
            self._recovered(destination, "it answered a probe")
        # Anything left queued by Synapse now goes directly.
        self._federation.wake_destination(destination)

    async def _probe_once(self, destination: str) -> None:
        """A probe feeds Synapse's backoff of the destination when Synapse is not
        backing off from it (as Synapse's own retries of a dead server would: the
        backoff grows, and Synapse's other requests to it keep backing off), and
        is made without feeding it otherwise."""
        try:
            await self._federation.probe(
                destination, timeout_ms=PROBE_TIMEOUT_MS, ignore_backoff=False
            )
        except BackedOff:
            await self._federation.probe(
                destination, timeout_ms=PROBE_TIMEOUT_MS, ignore_backoff=True
            )

    def _schedule_wake(self, destination: str, relays: Sequence[str]) -> None:
        """Wake the destination's queue when its first relay is due for a retry, so
        that what no relay took is deposited once a relay is back."""
        state = self.destinations.get(destination)
        if state.wake_scheduled:
            return
        state.wake_scheduled = True
        now = self._now()
        delay = self.relay_health.next_usable_ms(relays, now) - now
        self._api.delayed_background_call(
            delay + 1, self._wake, destination, desc="synapse_relay_wake"
        )

    def _wake(self, destination: str) -> None:
        self.destinations.get(destination).wake_scheduled = False
        self._federation.wake_destination(destination)


# What TransactionManager takes as "the destination accepted it all".
SENT_TO_RELAY: JsonDict = {"pdus": {}}


@attr.s(frozen=True, auto_attribs=True)
class _Decision:
    """How a transaction ended for Synapse: sent (`response`), an exception of
    Synapse's to raise again (`error`), or taken by nobody (neither)."""

    response: JsonDict | None = None
    error: Exception | None = None
    direct_failure: Unreachable | None = None


class _Timer(Protocol):
    """The IDelayedCall that `delayed_background_call` returns (a zope interface,
    which mypy cannot check without a plugin)."""

    def active(self) -> bool: ...

    def cancel(self) -> None: ...


class _Race:
    """One transaction to a destination not known to be down: its direct attempts
    and, when they failed or had no answer for `DEPOSIT_AFTER_MS`, its deposits,
    in parallel. The first to take it decides; the other goes on in the
    background (its outcome still updates what we know of the destination and
    the relays). Duplicates are harmless: same transaction id, same events.

    Each event (`_direct_ended`, `_deadline`, `_deposit_ended`) runs in its own
    background process; the decision is fired in the sentinel logcontext.
    """

    def __init__(
        self,
        api: ModuleApi,
        stats: RoleStats,
        txn: OutgoingTransaction,
        state: DestinationState,
        *,
        direct: Callable[[], Awaitable[JsonDict | Exception]],
        deposit: Callable[[], Awaitable[bool]],
    ) -> None:
        self._api = api
        self._stats = stats
        self._txn = txn
        self._state = state
        self._direct_attempts = direct
        self._deposit = deposit
        self._decided: defer.Deferred[_Decision] = defer.Deferred()
        # the direct attempts' outcome: an answer, an exception, or None (pending)
        self._direct: JsonDict | Exception | None = None
        # deposits: not started (None), under way, or ended (whether one accepted)
        self._depositing = False
        self._deposited: bool | None = None
        self._timer: _Timer | None = None

    async def run(self) -> _Decision:
        self._api.run_as_background_process(
            "synapse_relay_direct", self._direct_attempts
        ).addBoth(self._direct_ended)
        if not self._decided.called and not self._depositing:
            if self._state.silent:
                # An earlier transaction's attempts have had no answer for longer
                # than the deadline: no need to wait for this one's.
                self._deposit_early("its earlier transaction got no answer either")
            else:
                self._timer = cast(
                    _Timer,
                    self._api.delayed_background_call(
                        DEPOSIT_AFTER_MS,
                        self._deadline,
                        desc="synapse_relay_deposit_after",
                    ),
                )
        return await make_deferred_yieldable(self._decided)

    def _decide(self, decision: _Decision) -> None:
        if self._decided.called:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        fire_in_sentinel_context([self._decided], decision)

    def _direct_ended(self, outcome: JsonDict | Exception | None) -> None:
        if outcome is None:  # cannot happen: _direct_outcome never raises
            outcome = RuntimeError("the direct attempts ended without an outcome")
        self._direct = outcome
        self._state.silent = False
        if isinstance(outcome, dict):
            self._decide(_Decision(response=outcome))
        elif not isinstance(outcome, (Unreachable, BackedOff)):
            # the destination spoke (400, 403...), or a whitelist denial
            self._decide(_Decision(error=outcome))
        elif not self._depositing:
            self._start_deposits()
        elif self._deposited is False:
            self._decide(_Decision(direct_failure=self._direct_failure()))

    def _deadline(self) -> None:
        self._timer = None
        if self._decided.called or self._depositing:
            return
        self._state.silent = True
        self._deposit_early(f"no answer within {DEPOSIT_AFTER_MS} ms")

    def _deposit_early(self, why: str) -> None:
        self._stats.inc("early_deposits")
        logger.info(
            "Depositing transaction %s for %s on its relays while the direct"
            " attempts go on: %s",
            self._txn.transaction_id,
            self._txn.destination,
            why,
        )
        self._start_deposits()

    def _start_deposits(self) -> None:
        self._depositing = True
        self._api.run_as_background_process(
            "synapse_relay_deposits", self._deposit
        ).addBoth(self._deposit_ended)

    def _deposit_ended(self, accepted: bool | None) -> None:
        self._deposited = bool(accepted)
        if accepted:
            self._decide(_Decision(response=SENT_TO_RELAY))
        elif self._direct is not None:
            # the direct attempts failed too
            self._decide(_Decision(direct_failure=self._direct_failure()))

    def _direct_failure(self) -> Unreachable | None:
        return self._direct if isinstance(self._direct, Unreachable) else None


def start_send_role(
    config: SendConfig,
    directory: RelayDirectory,
    api: ModuleApi,
    on_delivered: Callable[[str], None],
) -> Sender | None:
    """Hook the send role into Synapse's federation sender, on the process that
    sends federation (the main process, or each federation_sender worker).

    It starts whether or not `send.relays` lists destinations: relays set through
    the admin API or discovered count without a restart. Destinations without
    relays are left to Synapse unchanged; `on_delivered(destination)` is called
    after each transaction a destination accepted directly (discovery).
    """
    if not sends_federation(api):
        logger.info(
            "Send role: this process does not send federation (a federation_sender"
            " worker does), nothing to do here"
        )
        return None
    for destination, relays in config.relays.items():
        ignored = set(relays) - set(usable_relays(destination, relays, api.server_name))
        if ignored:
            logger.warning(
                "send.relays of %s lists %s: ignored (a destination or this server"
                " cannot be a relay of the destination)",
                destination,
                ", ".join(sorted(ignored)),
            )
    sender = Sender(config, directory, OutboundFederation(api), api, on_delivered)
    intercept_outgoing_transactions(api, sender.send)
    bypass_backoff_for(sender.lets_through)
    on_remote_server_up(api, sender.remote_server_up)
    logger.info(
        "Send role enabled: relays configured for %d destinations (more may be set"
        " through the admin API); %d direct attempts before relaying",
        len(config.relays),
        config.attempts_before_relay,
    )
    return sender
