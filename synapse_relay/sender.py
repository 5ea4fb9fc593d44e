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
   transaction is deposited *as well*, while the attempts go on
   (`early_deposit.py`): the first of the two to take it decides what Synapse is
   told. A slow but alive destination still gets it directly, and the copy on the
   relays is a harmless duplicate (events are deduplicated by id, proven
   transactions by the origin's transaction id). While those attempts go on
   without an answer, later transactions are deposited at once (and tried
   directly all the same). Only failed attempts make the destination down.
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
including 507 quota) is skipped for `reach.relay_retry_delay_ms(failures)` (1 s
doubling to 30 s); the others are not held up by it.

Which relays a destination has is `directory.py`'s; what is known of destinations
and relays is kept in `reach.py`. Everything Synapse-internal is in
`_synapse/outbound.py`; the decisions here are plain code with the clock passed in,
unit-tested in tests/unit/test_sender.py.
"""

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from synapse.module_api import JsonDict, ModuleApi, make_deferred_yieldable
from twisted.internet import defer

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
from synapse_relay.directory import (
    RelayDirectory,
    RelaysOfDestination,
    Source,
    usable_relays,
)
from synapse_relay.early_deposit import SENT_TO_RELAY, Race
from synapse_relay.proof import OriginProof, signed_request, transaction_of
from synapse_relay.protocol import ORIGIN_AUTH, send_relay_path
from synapse_relay.reach import Destinations, Reach, RelayHealth
from synapse_relay.stats import RoleStats

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
# How often a down destination is probed directly, and the probe's timeout.
PROBE_INTERVAL_MS = 10_000
PROBE_TIMEOUT_MS = 5_000
# Timeout of one deposit on one relay (one database commit on the relay).
DEPOSIT_TIMEOUT_MS = 10_000


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
        decision = await Race(
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
