"""The receive role: the seed's P2P Node B, collecting its mail from its relays.

At start-up, every `receive.poll_interval` and on the admin `POST collect`, the
collector asks each of our relays, one after the other, for our mail (in batches,
fetching the next batch while Synapse processes the last transaction in hand, or
with Dendrite's `relay_txn` from relays without the batch endpoint: see
`relay_client.py`), and handles the transactions one at a time, in relay order:

1. *check* it (`prepare_transaction`): a transaction destined to another server,
   or whose origin is missing, not a server name, or us, is refused. When it
   carries an origin proof (DESIGN.md 2b) that verifies with the origin's key valid
   at its `origin_server_ts` (fetched from the relay's notary like PDU keys), it is
   *proven* and fed whole under the origin's own transaction id. Otherwise PDUs not
   sent by a user of the origin and EDUs outside `RELAYED_EDU_TYPES` are left out,
   so that a relay cannot make us process anything under an origin whose signature
   it does not carry (a proof that does not verify counts as none);
2. make sure we hold the origin's signing keys valid at the PDUs' timestamps,
   fetching them from the relay's key-notary endpoint when we do not (the origin
   is probably offline), never accepting a key that contradicts one we hold;
3. *feed* it to Synapse's normal inbound federation processing as if it had come
   from its origin (`FederationServer.on_incoming_transaction`) under the
   transaction id `relayed:<its id>` (unproven) or its id (proven); Synapse
   processes its PDUs in the background (they leave Synapse's inbound staging
   area);
4. *acknowledge* it once its PDUs are processed: its entry id goes in the next
   request to the relay, so the relay deletes it only after we processed it.

The next transaction is fed while Synapse still processes the previous ones, as
a direct sender does, within a window of unprocessed PDUs that keeps Synapse's
inbound staging area (which it prunes at 100 events per room) far from its limits
(`staging.py`); an entry is acknowledged once its PDUs left the staging area.

A transient failure (the relay unreachable or answering an error, our database
down, Synapse busy with another transaction of the same origin, a PDU failing for
a reason other than Synapse's verdict on it) stops the collection from that relay
without acknowledging the transaction, to be retried on the next round (what was
processed before it is acknowledged then). A transaction we
refuse or that Synapse rejects for good is acknowledged (it would fail forever),
with a warning. See docs/receive-role.rst for the reasons behind each rule.

Only one collection runs at a time in a process (a trigger during a collection
joins it), and only the instance that runs background tasks collects.
"""

import logging
from collections.abc import Collection, Mapping
from typing import Protocol

import attr
from synapse.module_api import (
    JsonDict,
    ModuleApi,
    make_deferred_yieldable,
)
from twisted.internet import defer

from synapse_relay._synapse import HeldKey, fire_in_sentinel_context
from synapse_relay._synapse.inbound import (
    InboundFederation,
    NotaryKeyRejected,
    RelayRequestFailed,
)
from synapse_relay.config import ReceiveConfig
from synapse_relay.inbound import (
    FeedOutcome,
    MalformedAnswer,
    Prepared,
    ProofToVerify,
    Refusal,
    RelayEntry,
    Verdict,
    edu_type_of,
    judge_feed,
    judge_offered_keys,
    keys_needed,
    keys_satisfied,
    offered_keys,
    prepare_transaction,
    proof_to_verify,
    retry_txn_id,
)
from synapse_relay.relay_client import (
    BATCH_RECHECK_MS,
    RELAY_TIMEOUT_MS,
    HandedOutAgain,
    RelayMailbox,
    RelayWire,
)
from synapse_relay.staging import StagingStuck, StagingWindow
from synapse_relay.stats import KindCounts, RoleStats
from synapse_relay.store import RelayStore

logger = logging.getLogger(__name__)

RECEIVE_COUNTERS = {
    "collections": "Collections started from a relay",
    "collected": "Transactions received from a relay",
    "processed": "Transactions processed by Synapse and acknowledged",
    "rejected": "Transactions acknowledged without processing: refused (not for us, "
    "bad origin) or rejected for good by Synapse",
    "failures": "Collections from a relay stopped by a transient failure",
    "pdus_dropped": "PDUs left out: not sent by a user of the transaction's origin",
    "pdus_rejected": "PDUs Synapse rejected for good (signature, ACL, ...)",
    "edus_dropped": "EDUs left out: not of a type processed when relayed unproven",
    "proven": "Transactions whose origin proof verified: fed whole",
    "proofs_failed": "Transactions whose origin proof did not verify or could not be"
    " verified: processed as unproven",
    "keys_fetched": "Key sets of an origin fetched from a relay's notary endpoint",
}


# The first collection, shortly after Synapse has started.
STARTUP_DELAY_MS = 1_000
# After a collection that failed while our database did not answer, the database
# is checked this often, and we collect again as soon as it answers (rather than
# at the next poll interval).
DATABASE_CHECK_MS = 500
# A transaction that fails this many times in a row while our database answers
# is given up (acknowledged), so that it cannot block the mailbox forever.
GIVE_UP_AFTER_ATTEMPTS = 10


@attr.s(auto_attribs=True)
class RelayCollection:
    """What one collection from one relay did."""

    processed: int = 0
    rejected: int = 0
    # why the collection stopped before the mailbox was empty
    error: str | None = None

    def to_json(self) -> JsonDict:
        return {
            "processed": self.processed,
            "rejected": self.rejected,
            "error": self.error,
        }


@attr.s(auto_attribs=True)
class CollectionResult:
    relays: dict[str, RelayCollection] = attr.Factory(dict)

    @property
    def processed(self) -> int:
        return sum(r.processed for r in self.relays.values())

    @property
    def rejected(self) -> int:
        return sum(r.rejected for r in self.relays.values())

    def to_json(self) -> JsonDict:
        return {
            "processed": self.processed,
            "rejected": self.rejected,
            "relays": {relay: r.to_json() for relay, r in self.relays.items()},
        }


class ReceiveStats(RoleStats):
    """The receive role's counters per relay, and its EDUs by type and outcome."""

    def __init__(self) -> None:
        super().__init__("receive", RECEIVE_COUNTERS, per_relay=True)
        self.edus = KindCounts(
            "synapse_relay_receive_edus_total",
            "EDUs of collected transactions by type: processed (fed to Synapse) or"
            " dropped (left out of an unproven transaction)",
            "edu_type",
        )

    def snapshot(self) -> dict[str, object]:
        result = super().snapshot()
        result["edus_by_type"] = self.edus.snapshot()
        return result


class Homeserver(RelayWire, Protocol):
    """What the collector needs from Synapse (`_synapse.inbound.InboundFederation`)."""

    async def query_notary(
        self, notary: str, server_name: str, timeout_ms: int
    ) -> list[JsonDict]: ...

    async def held_keys(
        self, server_name: str, key_ids: Collection[str]
    ) -> dict[str, HeldKey]: ...

    async def store_notary_keys(self, notary: str, keys: JsonDict) -> None: ...

    async def verify_signed(
        self, server_name: str, signed: JsonDict, valid_at_ms: int
    ) -> None: ...

    async def previous_response(
        self, origin: str, txn_id: str
    ) -> tuple[int, JsonDict] | None: ...

    async def feed(
        self, origin: str, txn_id: str, transaction: JsonDict
    ) -> tuple[int, JsonDict]: ...

    async def still_staged(
        self, origin: str, event_ids: Collection[str]
    ) -> set[str]: ...

    async def process_staged(self) -> None: ...


class _Stop(Exception):
    """Stops the collection from a relay without acknowledging the current entry."""

    def __init__(self, reason: str, counts_as_attempt: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.counts_as_attempt = counts_as_attempt


def start_receive_role(
    config: ReceiveConfig, store: RelayStore, api: ModuleApi
) -> "Collector | None":
    """Collect at start-up and every poll interval, if we have relays.

    Every process gets a Collector (for the admin API and `status`), but only the
    instance that runs background tasks collects.
    """
    if not config.relays:
        return None
    collector = Collector(config, InboundFederation(api), api, store)
    if collector.runs_here:
        api.delayed_background_call(
            STARTUP_DELAY_MS, collector.collect, desc="synapse_relay_collect"
        )
        api.looping_background_call(
            collector.collect, config.poll_interval_ms, desc="synapse_relay_collect"
        )
        logger.info(
            "Receive role enabled: collecting our mail from %s every %d ms",
            ", ".join(config.relays),
            config.poll_interval_ms,
        )
    else:
        logger.info(
            "Receive role: the instance that runs background tasks collects our"
            " mail from %s, not this one",
            ", ".join(config.relays),
        )
    return collector


class Collector:
    """Collects our mail from our relays, one collection at a time.

    `collect()` starts a collection, or joins the one under way, and returns its
    result. State kept between collections, in memory: acknowledgements that could
    not be sent, and how many times in a row each transaction failed.
    """

    def __init__(
        self,
        config: ReceiveConfig,
        homeserver: Homeserver,
        api: ModuleApi,
        store: RelayStore,
    ) -> None:
        self._config = config
        self._hs = homeserver
        self._api = api
        self._store = store
        self.runs_here = api.should_run_background_tasks()
        self.stats = ReceiveStats()
        # callers waiting for the collection under way
        self._waiters: list[defer.Deferred[CollectionResult]] = []
        # relay -> entries processed but not yet acknowledged (the request that
        # carried the acknowledgement failed, or the collection stopped first)
        self._unacknowledged: dict[str, list[int]] = {}
        # relay -> until when it is collected from with relay_txn (it answered
        # that it has no batch collect endpoint)
        self._no_batch_until: dict[str, int] = {}
        # (relay, origin, txn id) -> consecutive failed attempts
        self._attempts: dict[tuple[str, str, str], int] = {}
        # (relay, origin) whose notary was asked during this collection
        self._notary_asked: set[tuple[str, str]] = set()
        # a transient failure of this collection came with our database down
        self._database_failed = False
        self._database_check_scheduled = False

    async def collect(self) -> CollectionResult:
        """Collect our mail from every relay; join the collection under way if any."""
        waiter: defer.Deferred[CollectionResult] = defer.Deferred()
        self._waiters.append(waiter)
        if len(self._waiters) == 1:
            self._api.run_as_background_process(
                "synapse_relay_collection", self._collect_and_wake_waiters
            )
        return await make_deferred_yieldable(waiter)

    async def _collect_and_wake_waiters(self) -> None:
        result = CollectionResult()
        self._notary_asked.clear()
        self._database_failed = False
        try:
            for relay in self._config.relays:
                try:
                    result.relays[relay] = await self._collect_from(relay)
                except Exception as e:
                    logger.exception("Collection from relay %s failed", relay)
                    result.relays[relay] = self._failed(
                        relay, RelayCollection(), f"unexpected error: {e!r}"
                    )
        finally:
            waiters, self._waiters = self._waiters, []
            fire_in_sentinel_context(waiters, result)
        if result.processed or result.rejected:
            logger.info(
                "Collected our mail: %d transactions processed, %d rejected",
                result.processed,
                result.rejected,
            )
        if self._database_failed:
            self._check_database_soon()

    def _check_database_soon(self) -> None:
        """Collect again as soon as our database answers."""
        if self._database_check_scheduled:
            return
        self._database_check_scheduled = True
        self._api.delayed_background_call(
            DATABASE_CHECK_MS,
            self._collect_if_database_answers,
            desc="synapse_relay_database_check",
        )

    async def _collect_if_database_answers(self) -> None:
        self._database_check_scheduled = False
        if not await self._database_answers():
            self._check_database_soon()
            return
        logger.info("Our database answers again: collecting our mail now")
        try:
            # What the outage interrupted first, rather than after a wait.
            await self._hs.process_staged()
        except Exception:
            logger.warning("Could not process Synapse's staging area", exc_info=True)
        await self.collect()

    async def _collect_from(self, relay: str) -> RelayCollection:
        """Collect from one relay until its mailbox is empty or something fails."""
        done = RelayCollection()
        self.stats.inc("collections", relay)
        mailbox = RelayMailbox(
            self._hs,
            relay,
            self._unacknowledged.pop(relay, []),
            batch=self._api.get_current_time_msec()
            >= self._no_batch_until.get(relay, 0),
        )
        try:
            return await self._collect_mailbox(relay, mailbox, done)
        finally:
            if mailbox.unacknowledged:
                # They may or may not have been deleted: acknowledge them again.
                self._unacknowledged[relay] = mailbox.unacknowledged
            if mailbox.lacks_batch:
                self._no_batch_until[relay] = (
                    self._api.get_current_time_msec() + BATCH_RECHECK_MS
                )

    async def _collect_mailbox(
        self, relay: str, mailbox: RelayMailbox, done: RelayCollection
    ) -> RelayCollection:
        verdicts: dict[int, Verdict] = {}

        def finished(entry_id: int) -> None:
            """An entry is processed (or rejected): count and acknowledge it."""
            verdict = verdicts.pop(entry_id)
            if verdict is Verdict.PROCESSED:
                done.processed += 1
            else:
                done.rejected += 1
            self.stats.inc(verdict.value, relay)
            mailbox.done(entry_id)

        window = StagingWindow(self._hs, self._api, finished)
        try:
            while True:
                if not mailbox.batch:
                    # relay_txn hands out the next entry only once this one is
                    # acknowledged
                    await window.drain()
                entry = await mailbox.next()
                if entry is None:
                    if window.empty:
                        return done
                    await window.drain()  # then acknowledge, and ask again
                    continue
                self.stats.inc("collected", relay)
                verdicts[entry.entry_id], origin, staged = await self._handle(
                    relay, entry, window
                )
                window.add(entry.entry_id, origin, staged)
        except (RelayRequestFailed, MalformedAnswer, HandedOutAgain) as e:
            reason = f"{mailbox.wire_form} failed: {e}"
        except _Stop as e:
            reason = e.reason
        except StagingStuck as e:
            reason = str(e)
            if e.database and not await self._database_answers():
                self._database_failed = True
        # What was fed and not acknowledged is fed again next time (Synapse
        # answers a transaction id it processed with its stored answer).
        return self._failed(relay, done, reason)

    def _failed(
        self, relay: str, done: RelayCollection, reason: str
    ) -> RelayCollection:
        self.stats.inc("failures", relay)
        logger.warning(
            "Collection from relay %s stopped, to be retried on the next round: %s",
            relay,
            reason,
        )
        done.error = reason
        return done

    async def _handle(
        self, relay: str, entry: RelayEntry, window: StagingWindow
    ) -> tuple[Verdict, str, Collection[str]]:
        """Feed one entry: PROCESSED or REJECTED (acknowledge it once its PDUs are
        processed), its origin and its PDUs Synapse staged; or raise _Stop."""
        now_ms = self._api.get_current_time_msec()
        to_verify = proof_to_verify(entry, self._hs.server_name, now_ms)
        proven = False
        if isinstance(to_verify, str):
            self.stats.inc("proofs_failed", relay)
            logger.warning(
                "The origin proof of entry %d from relay %s cannot be verified (%s):"
                " processing it as unproven",
                entry.entry_id,
                relay,
                to_verify,
            )
        elif to_verify is not None:
            try:
                proven = await self._verify_proof(relay, to_verify)
            except _Stop as e:
                key = (relay, to_verify.origin, to_verify.txn_id)
                return await self._transient(key, entry, e), "", ()
        prepared = prepare_transaction(
            entry.transaction, self._hs.server_name, now_ms, proven=proven
        )
        if isinstance(prepared, Refusal):
            logger.warning(
                "Refusing entry %d from relay %s, and acknowledging it: %s",
                entry.entry_id,
                relay,
                prepared.reason,
            )
            return Verdict.REJECTED, "", ()
        origin = prepared.origin
        if prepared.derived_id:
            logger.debug(
                "Entry %d from relay %s has no transaction_id: using %s",
                entry.entry_id,
                relay,
                prepared.txn_id,
            )
        for event_id, reason in prepared.dropped_pdus.items():
            logger.warning(
                "Leaving out PDU %s of transaction %s from %s (relay %s): %s",
                event_id,
                prepared.txn_id,
                origin,
                relay,
                reason,
            )
        if prepared.dropped_pdus:
            self.stats.inc("pdus_dropped", relay, len(prepared.dropped_pdus))
        if prepared.dropped_edus:
            logger.info(
                "Leaving out EDUs of unproven transaction %s from %s (relay %s): %s",
                prepared.txn_id,
                origin,
                relay,
                ", ".join(
                    f"{count} {edu_type} ({why})"
                    for (edu_type, why), count in prepared.dropped_edus.items()
                ),
            )
            for (edu_type, _), count in prepared.dropped_edus.items():
                self.stats.edus.inc(edu_type, "dropped", count)
            self.stats.inc("edus_dropped", relay, sum(prepared.dropped_edus.values()))

        key = (relay, origin, prepared.txn_id)
        try:
            outcome = await self._feed(relay, prepared, window)
        except _Stop as e:
            return await self._transient(key, entry, e), origin, ()
        self._attempts.pop(key, None)
        if outcome.verdict is Verdict.REJECTED:
            logger.warning(
                "%s: transaction %s from %s (entry %d, relay %s) acknowledged",
                outcome.reason,
                prepared.txn_id,
                origin,
                entry.entry_id,
                relay,
            )
            return Verdict.REJECTED, origin, ()
        for event_id, error in outcome.rejected.items():
            logger.warning(
                "Synapse rejected PDU %s of transaction %s from %s (relay %s): %s",
                event_id,
                prepared.txn_id,
                origin,
                relay,
                error,
            )
        if outcome.rejected:
            self.stats.inc("pdus_rejected", relay, len(outcome.rejected))
        for edu in prepared.body["edus"]:
            self.stats.edus.inc(edu_type_of(edu), "processed")
        logger.info(
            "Fed %s transaction %s from %s (entry %d from relay %s): %d PDUs"
            " accepted, %d rejected, %d EDUs",
            "proven" if prepared.proven else "unproven",
            prepared.txn_id,
            origin,
            entry.entry_id,
            relay,
            len(outcome.accepted),
            len(outcome.rejected),
            len(prepared.body["edus"]),
        )
        return Verdict.PROCESSED, origin, outcome.accepted

    async def _verify_proof(self, relay: str, to_verify: ProofToVerify) -> bool:
        """Whether the entry's origin proof verifies with a key of its origin valid
        at the transaction's origin_server_ts; raises _Stop when the key cannot be
        fetched from the relay for now. A proof that does not verify, for whatever
        reason, leaves the entry unproven (never proven on the relay's word)."""
        origin = to_verify.origin
        await self._ensure_keys(
            relay, origin, {to_verify.proof.key: to_verify.valid_at_ms}
        )
        try:
            await self._hs.verify_signed(
                origin, to_verify.signed, to_verify.valid_at_ms
            )
        except Exception as e:
            self.stats.inc("proofs_failed", relay)
            logger.warning(
                "The origin proof of transaction %s from %s (relay %s) does not"
                " verify with %s valid at %d (%s): processing it as unproven",
                to_verify.txn_id,
                origin,
                relay,
                to_verify.proof.key,
                to_verify.valid_at_ms,
                e,
            )
            return False
        self.stats.inc("proven", relay)
        return True

    async def _feed(
        self, relay: str, prepared: Prepared, window: StagingWindow
    ) -> FeedOutcome:
        """Feed a transaction to Synapse once its PDUs fit in the staging window."""
        origin = prepared.origin
        needed = keys_needed(prepared.body["pdus"], origin)
        if needed:
            await self._ensure_keys(relay, origin, needed)
        try:
            await window.make_room(len(prepared.body["pdus"]))
        except StagingStuck as e:
            raise _Stop(str(e), counts_as_attempt=e.database) from e
        txn_id = prepared.fed_txn_id
        try:
            previous = await self._hs.previous_response(origin, txn_id)
            if previous is not None and judge_feed(*previous).verdict is (
                Verdict.TRANSIENT
            ):
                # Synapse would answer the failure it stored: use a fresh id.
                txn_id = retry_txn_id(txn_id, self._api.get_current_time_msec())
            code, response = await self._hs.feed(origin, txn_id, prepared.body)
        except Exception as e:
            logger.warning(
                "Synapse failed to process transaction %s from %s (relay %s)",
                prepared.txn_id,
                origin,
                relay,
                exc_info=True,
            )
            raise _Stop(f"Synapse failed: {e!r}") from e
        outcome = judge_feed(code, response)
        if outcome.verdict is Verdict.TRANSIENT:
            raise _Stop(outcome.reason, outcome.counts_as_attempt)
        return outcome

    async def _ensure_keys(
        self, relay: str, origin: str, needed: Mapping[str, int]
    ) -> None:
        """Make sure we hold the origin's keys valid at its PDUs' timestamps,
        fetching them from the relay's key-notary endpoint if we do not.

        The relay authenticated the origin when it deposited, so it holds keys the
        origin itself served. Its answer is stored only when signed by the relay
        and self-signed by the origin (as Synapse checks a trusted key server's),
        contradicting no key we hold, and useful (`judge_offered_keys`). When the
        relay cannot be asked, collection stops (feeding now could make Synapse
        reject the events for good); when it has nothing usable, Synapse tries the
        origin itself.
        """
        try:
            held = await self._hs.held_keys(origin, list(needed))
        except Exception as e:
            raise _Stop(f"reading the keys of {origin} failed: {e!r}") from e
        if keys_satisfied(held, needed) or (relay, origin) in self._notary_asked:
            return
        self._notary_asked.add((relay, origin))
        try:
            answers = await self._hs.query_notary(relay, origin, RELAY_TIMEOUT_MS)
        except RelayRequestFailed as e:
            if e.code is not None and 400 <= e.code < 500 and e.code != 429:
                logger.info(
                    "Relay %s does not serve the keys of %s (%s); Synapse will ask"
                    " %s itself",
                    relay,
                    origin,
                    e.reason,
                    origin,
                )
                return
            raise _Stop(f"fetching the keys of {origin} failed: {e}") from e
        for keys in answers:
            if keys.get("server_name") != origin:
                continue
            try:
                held = await self._hs.held_keys(origin, list(offered_keys(keys)))
            except Exception as e:
                raise _Stop(f"reading the keys of {origin} failed: {e!r}") from e
            objection = judge_offered_keys(held, needed, keys)
            if objection is not None:
                level = logging.WARNING if "contradicts" in objection else logging.INFO
                logger.log(
                    level,
                    "Not storing the keys of %s offered by relay %s: %s",
                    origin,
                    relay,
                    objection,
                )
                continue
            try:
                await self._hs.store_notary_keys(relay, keys)
            except NotaryKeyRejected as e:
                logger.warning(
                    "Keys of %s offered by relay %s failed verification: %s",
                    origin,
                    relay,
                    e,
                )
                continue
            except Exception as e:
                raise _Stop(f"storing the keys of {origin} failed: {e!r}") from e
            self.stats.inc("keys_fetched", relay)
            logger.info(
                "Stored keys %s of %s fetched from relay %s",
                ", ".join(sorted(offered_keys(keys))),
                origin,
                relay,
            )

    async def _transient(
        self, key: tuple[str, str, str], entry: RelayEntry, stop: _Stop
    ) -> Verdict:
        """Count a transient failure of an entry; give it up after too many."""
        if not stop.counts_as_attempt:
            raise stop
        if not await self._database_answers():
            self._database_failed = True
            raise stop
        attempts = self._attempts.get(key, 0) + 1
        if attempts < GIVE_UP_AFTER_ATTEMPTS:
            self._attempts[key] = attempts
            raise stop
        self._attempts.pop(key, None)
        relay, origin, txn_id = key
        logger.error(
            "Giving up transaction %s from %s (entry %d from relay %s) after %d"
            " failed attempts, and acknowledging it: %s",
            txn_id,
            origin,
            entry.entry_id,
            relay,
            attempts,
            stop.reason,
        )
        return Verdict.REJECTED

    async def _database_answers(self) -> bool:
        try:
            await self._store.ping()
        except Exception:
            return False
        return True
