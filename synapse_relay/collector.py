"""The receive role: the seed's P2P Node B, collecting its mail from its relays.

At start-up, every `receive.poll_interval` and on the admin `POST collect`, the
collector asks each of our relays, one after the other, for our mail with
`GET relay_txn/@_relay:<us>` and handles the transactions one at a time, in relay
order:

1. *check* it (`prepare_transaction`): a transaction destined to another server,
   or whose origin is missing, not a server name, or us, is refused; PDUs not sent
   by a user of the origin and EDUs outside `RELAYED_EDU_TYPES` are left out, so
   that a relay cannot make us process anything under an origin whose signature
   it does not carry;
2. make sure we hold the origin's signing keys valid at the PDUs' timestamps,
   fetching them from the relay's key-notary endpoint when we do not (the origin
   is probably offline), never accepting a key that contradicts one we hold;
3. *feed* it to Synapse's normal inbound federation processing as if it had come
   from its origin (`FederationServer.on_incoming_transaction`) under the
   transaction id `relayed:<its id>`, and wait until Synapse has processed its
   PDUs (they leave Synapse's inbound staging area);
4. *acknowledge* it: its entry id goes in the next relay_txn request, so the relay
   deletes it only after we processed it.

A transient failure (the relay unreachable or answering an error, our database
down, Synapse busy with another transaction of the same origin, a PDU failing for
a reason other than Synapse's verdict on it) stops the collection from that relay
without acknowledging anything, to be retried on the next round. A transaction we
refuse or that Synapse rejects for good is acknowledged (it would fail forever),
with a warning. See README.rst, "Receive role", for the reasons behind each rule.

Only one collection runs at a time in a process (a trigger during a collection
joins it), and only the instance that runs background tasks collects.
"""

import base64
import hashlib
import logging
import re
from collections.abc import Collection, Mapping
from enum import Enum
from typing import Any, Protocol

import attr
from canonicaljson import encode_canonical_json
from synapse.module_api import (
    JsonDict,
    ModuleApi,
    make_deferred_yieldable,
)
from twisted.internet import defer

from synapse_relay._synapse import (
    HeldKey,
    InboundFederation,
    NotaryKeyRejected,
    RelayRequestFailed,
    fire_in_sentinel_context,
    is_valid_server_name,
)
from synapse_relay.config import ReceiveConfig
from synapse_relay.protocol import MAX_EDUS, MAX_PDUS, relay_txn_path
from synapse_relay.stats import RoleStats
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
    "edus_dropped": "EDUs left out: not of a type processed when relayed",
    "keys_fetched": "Key sets of an origin fetched from a relay's notary endpoint",
}

# Transactions are fed to Synapse under this prefix + the origin's transaction id:
# Synapse deduplicates by (origin, transaction id) for a day, so a relay that could
# hand us a forged transaction under the id of a future direct transaction of that
# origin would make Synapse ignore the real one.
FED_TXN_ID_PREFIX = "relayed:"
# Prefix of the ids derived from the content, for relays that omit transaction_id.
DERIVED_TXN_ID_PREFIX = "derived-"

# EDUs are not signed: a relay could forge them with any origin. Only to-device
# messages that clients authenticate end to end (Olm) are processed when relayed.
RELAYED_EDU_TYPES = frozenset({"m.direct_to_device"})
RELAYED_TO_DEVICE_TYPES = frozenset({"m.room.encrypted"})

RELAY_TIMEOUT_MS = 30_000
# The first collection, shortly after Synapse has started.
STARTUP_DELAY_MS = 1_000
# How long Synapse may take to process the PDUs of one fed transaction.
PROCESSING_TIMEOUT_MS = 60_000
# Checked often at first (fed PDUs typically take 10-30 ms; each check is one
# indexed query), then less: this bounds the wait between one transaction's
# processing and the next fetch, which sets the pace of a collection.
PROCESSING_POLL_MS = (2,) * 15 + (10, 20, 50, 100, 200, 500)
# A transaction that fails this many times in a row while our database answers
# is given up (acknowledged), so that it cannot block the mailbox forever.
GIVE_UP_AFTER_ATTEMPTS = 10

# The form of a FederationError's text, Synapse's verdict on a PDU
# (api/errors.py: "<level> <code>: <reason>").
_FEDERATION_ERROR = re.compile(r"^(FATAL|ERROR|WARN) \d{3}: ")
# crypto/keyring.py: no key of the signing server valid at the event's timestamp
# could be found; the origin or a notary may have one later.
_KEY_NOT_FOUND = "Failed to find any key to satisfy"


class Verdict(Enum):
    PROCESSED = "processed"
    REJECTED = "rejected"
    TRANSIENT = "transient"


@attr.s(frozen=True, auto_attribs=True)
class RelayEntry:
    entry_id: int
    transaction: Any


class MalformedAnswer(Exception):
    """A relay's answer to relay_txn is not what the protocol says."""


def parse_relay_answer(answer: Any) -> RelayEntry | None:
    """The entry a relay_txn answer carries; None when the mailbox is empty.

    An answer carries an entry when its `transaction` is a non-empty object, then
    with an `entry_id` >= 1 (Dendrite may say `entries_queued: false` with the last
    one, so that flag is not relied upon).
    """
    if not isinstance(answer, dict):
        raise MalformedAnswer("the answer is not a JSON object")
    transaction = answer.get("transaction")
    if transaction is None or transaction == {}:
        return None
    entry_id = answer.get("entry_id")
    if not isinstance(entry_id, int) or isinstance(entry_id, bool) or entry_id < 1:
        raise MalformedAnswer(f"entry_id {entry_id!r} is not an integer >= 1")
    return RelayEntry(entry_id=entry_id, transaction=transaction)


@attr.s(frozen=True, auto_attribs=True)
class Refusal:
    reason: str


@attr.s(frozen=True, auto_attribs=True)
class Prepared:
    """A relayed transaction as it will be fed to Synapse."""

    origin: str
    # the origin's transaction id, or one derived from the content
    txn_id: str
    derived_id: bool
    # the transaction object to feed: origin, origin_server_ts, pdus, edus
    body: JsonDict
    # event id (or "<no event_id>") -> why the PDU was left out
    dropped_pdus: dict[str, str]
    dropped_edus: int

    @property
    def fed_txn_id(self) -> str:
        return FED_TXN_ID_PREFIX + self.txn_id


def derive_txn_id(transaction: JsonDict) -> str:
    """A stable transaction id for a relay that omits `transaction_id` (Dendrite):
    `derived-` + the unpadded URL-safe base64 of the SHA-256 of the transaction's
    canonical JSON, so that the same transaction collected twice gets the same id.
    """
    digest = hashlib.sha256(encode_canonical_json(transaction)).digest()
    return DERIVED_TXN_ID_PREFIX + base64.urlsafe_b64encode(digest).decode(
        "ascii"
    ).rstrip("=")


def server_of(user_id: Any) -> str | None:
    """The server name of a user ID, as Synapse's `get_domain_from_id` takes it."""
    if not isinstance(user_id, str) or not user_id.startswith("@"):
        return None
    _, sep, server = user_id.partition(":")
    return server if sep and server else None


def is_relayable_edu(edu: Any, origin: str) -> bool:
    """Whether a relayed EDU is processed (see RELAYED_EDU_TYPES)."""
    if not isinstance(edu, dict) or edu.get("edu_type") not in RELAYED_EDU_TYPES:
        return False
    content = edu.get("content")
    return (
        isinstance(content, dict)
        and content.get("type") in RELAYED_TO_DEVICE_TYPES
        and server_of(content.get("sender")) == origin
        and isinstance(content.get("messages"), dict)
    )


def prepare_transaction(
    transaction: Any, our_server_name: str, now_ms: int
) -> Prepared | Refusal:
    """Check a relayed transaction and build what is fed to Synapse.

    The relay's word is trusted for nothing that Synapse will not check: the
    transaction's origin must be a server name other than ours; every PDU fed must
    be sent by a user of that origin, so that Synapse's check of the sender
    server's signature proves the origin signed it; only end-to-end authenticated
    EDUs are kept.
    """
    if not isinstance(transaction, dict):
        return Refusal("the transaction is not a JSON object")
    destination = transaction.get("destination")
    if destination is not None and destination != our_server_name:
        return Refusal(f"it is destined to {destination!r}, not to us")
    origin = transaction.get("origin")
    if not isinstance(origin, str) or not is_valid_server_name(origin):
        return Refusal(f"its origin {origin!r} is not a server name")
    if origin == our_server_name:
        return Refusal("its origin is this server")
    pdus = transaction.get("pdus") or []
    edus = transaction.get("edus") or []
    for key, items, maximum in (("pdus", pdus, MAX_PDUS), ("edus", edus, MAX_EDUS)):
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            return Refusal(f"its {key} is not a list of JSON objects")
        if len(items) > maximum:
            return Refusal(f"it has {len(items)} {key}, more than {maximum}")

    given_id = transaction.get("transaction_id")
    derived = not isinstance(given_id, str) or not given_id
    txn_id = derive_txn_id(transaction) if derived else str(given_id)

    kept_pdus = []
    dropped_pdus = {}
    for pdu in pdus:
        sender_server = server_of(pdu.get("sender"))
        if sender_server == origin:
            kept_pdus.append(pdu)
        else:
            event_id = pdu.get("event_id")
            dropped_pdus[event_id if isinstance(event_id, str) else "<no event_id>"] = (
                f"sent by {pdu.get('sender')!r}, not by a user of the origin {origin}"
            )
    kept_edus = [edu for edu in edus if is_relayable_edu(edu, origin)]

    origin_server_ts = transaction.get("origin_server_ts")
    if not isinstance(origin_server_ts, int) or isinstance(origin_server_ts, bool):
        origin_server_ts = now_ms
    return Prepared(
        origin=origin,
        txn_id=txn_id,
        derived_id=derived,
        body={
            "origin": origin,
            "origin_server_ts": origin_server_ts,
            "destination": our_server_name,
            "pdus": kept_pdus,
            "edus": kept_edus,
        },
        dropped_pdus=dropped_pdus,
        dropped_edus=len(edus) - len(kept_edus),
    )


def keys_needed(pdus: list[JsonDict], origin: str) -> dict[str, int]:
    """The origin's key ids signing `pdus`, each with the latest PDU timestamp it
    must be valid at (Synapse checks a PDU's signature with a key valid at its
    `origin_server_ts`)."""
    needed: dict[str, int] = {}
    for pdu in pdus:
        signatures = pdu.get("signatures")
        key_ids = signatures.get(origin) if isinstance(signatures, dict) else None
        if not isinstance(key_ids, dict):
            continue
        ts = pdu.get("origin_server_ts")
        ts = ts if isinstance(ts, int) and not isinstance(ts, bool) else 0
        for key_id in key_ids:
            needed[key_id] = max(needed.get(key_id, 0), ts)
    return needed


def keys_satisfied(held: Mapping[str, HeldKey], needed: Mapping[str, int]) -> bool:
    return all(
        key_id in held and held[key_id].valid_until_ts >= ts
        for key_id, ts in needed.items()
    )


def offered_keys(keys: JsonDict) -> dict[str, tuple[str, int]]:
    """key id -> (unpadded base64 key, valid until) of a server keys object."""
    offered: dict[str, tuple[str, int]] = {}
    valid_until = keys.get("valid_until_ts")
    fields = (("verify_keys", None), ("old_verify_keys", "expired_ts"))
    for field, until_field in fields:
        section = keys.get(field)
        if not isinstance(section, dict):
            continue
        for key_id, data in section.items():
            if not isinstance(data, dict) or not isinstance(data.get("key"), str):
                continue
            until = data.get(until_field) if until_field else valid_until
            offered[key_id] = (
                data["key"].rstrip("="),
                until if isinstance(until, int) and not isinstance(until, bool) else 0,
            )
    return offered


def judge_offered_keys(
    held: Mapping[str, HeldKey], needed: Mapping[str, int], keys: JsonDict
) -> str | None:
    """Why a relay's notary answer for an origin must not be stored; None if it may.

    It may when it contradicts no key we hold for the same key id (a relay must not
    be able to replace a key we know) and it gives a needed key a longer validity
    than the one we hold (otherwise it is of no use, and storing it would make
    Synapse prefer its shorter validity, the copy added last winning).
    """
    offered = offered_keys(keys)
    for key_id, (key, _) in offered.items():
        mine = held.get(key_id)
        if mine is not None and mine.key.rstrip("=") != key:
            return f"its key {key_id} contradicts the one we hold"
    for key_id, (_, valid_until) in offered.items():
        if key_id in needed:
            mine = held.get(key_id)
            if mine is None or valid_until > mine.valid_until_ts:
                return None
    return "it has no needed key valid for longer than the ones we hold"


@attr.s(frozen=True, auto_attribs=True)
class FeedOutcome:
    verdict: Verdict
    reason: str = ""
    # event ids Synapse accepted (staged for processing)
    accepted: tuple[str, ...] = ()
    # event id -> why Synapse rejected it for good
    rejected: Mapping[str, str] = attr.Factory(dict)
    # whether a transient failure says something is wrong with this transaction
    # (counts towards giving it up), rather than that Synapse is busy
    counts_as_attempt: bool = True


def is_permanent_pdu_error(result: JsonDict) -> bool:
    """Whether Synapse's per-PDU answer in a /send response is its verdict on the
    PDU (it would say the same again), rather than an unexpected failure.

    Verdicts are FederationErrors ("ERROR 403: ...", bad signature or hash) and
    SynapseErrors with an errcode (the server ACL), except when no signing key could
    be found, which a later attempt may find. Anything else is an exception Synapse
    did not expect (the database, for one).
    """
    if "errcode" in result:
        return True
    error = str(result.get("error", ""))
    return bool(_FEDERATION_ERROR.match(error)) and _KEY_NOT_FOUND not in error


def judge_feed(code: int, response: Any) -> FeedOutcome:
    """What Synapse's answer to a fed transaction means for its entry."""
    if code == 429:
        return FeedOutcome(
            Verdict.TRANSIENT,
            "Synapse is processing another transaction of the same origin",
            counts_as_attempt=False,
        )
    if code >= 500:
        return FeedOutcome(Verdict.TRANSIENT, f"Synapse answered {code}")
    if code != 200:
        return FeedOutcome(Verdict.REJECTED, f"Synapse refused it ({code})")
    pdus = response.get("pdus") if isinstance(response, dict) else None
    if not isinstance(pdus, dict):
        pdus = {}
    accepted = []
    rejected = {}
    transient = {}
    for event_id, result in pdus.items():
        failed = isinstance(result, dict) and ("error" in result or "errcode" in result)
        if not failed:
            accepted.append(event_id)
        elif is_permanent_pdu_error(result):
            rejected[event_id] = str(result.get("error"))
        else:
            transient[event_id] = str(result.get("error"))
    if transient:
        event_id, error = next(iter(transient.items()))
        return FeedOutcome(
            Verdict.TRANSIENT,
            f"Synapse failed to handle {len(transient)} PDUs, e.g. {event_id}: {error}",
        )
    return FeedOutcome(Verdict.PROCESSED, accepted=tuple(accepted), rejected=rejected)


def retry_txn_id(fed_txn_id: str, now_ms: int) -> str:
    """A fresh transaction id for feeding a transaction again: Synapse answers a
    transaction id it has answered before with the same (stored) answer."""
    return f"{fed_txn_id}:retry:{now_ms}"


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


class Homeserver(Protocol):
    """What the collector needs from Synapse (`_synapse.InboundFederation`)."""

    server_name: str

    async def get_with_body(
        self, destination: str, path: str, content: JsonDict, timeout_ms: int
    ) -> Any: ...

    async def query_notary(
        self, notary: str, server_name: str, timeout_ms: int
    ) -> list[JsonDict]: ...

    async def held_keys(
        self, server_name: str, key_ids: Collection[str]
    ) -> dict[str, HeldKey]: ...

    async def store_notary_keys(self, notary: str, keys: JsonDict) -> None: ...

    async def previous_response(
        self, origin: str, txn_id: str
    ) -> tuple[int, JsonDict] | None: ...

    async def feed(
        self, origin: str, txn_id: str, transaction: JsonDict
    ) -> tuple[int, JsonDict]: ...

    async def still_staged(
        self, origin: str, event_ids: Collection[str]
    ) -> set[str]: ...


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
        self.stats = RoleStats("receive", RECEIVE_COUNTERS, per_relay=True)
        # callers waiting for the collection under way
        self._waiters: list[defer.Deferred[CollectionResult]] = []
        # relay -> an entry processed but not yet acknowledged (the request that
        # carried the acknowledgement failed)
        self._unacknowledged: dict[str, int] = {}
        # (relay, origin, txn id) -> consecutive failed attempts
        self._attempts: dict[tuple[str, str, str], int] = {}
        # (relay, origin) whose notary was asked during this collection
        self._notary_asked: set[tuple[str, str]] = set()

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

    async def _collect_from(self, relay: str) -> RelayCollection:
        """Collect from one relay until its mailbox is empty or something fails."""
        done = RelayCollection()
        self.stats.inc("collections", relay)
        acknowledge = self._unacknowledged.pop(relay, 0)
        handed_out: set[int] = set()
        while True:
            try:
                answer = await self._hs.get_with_body(
                    relay,
                    relay_txn_path(self._hs.server_name),
                    {"entry_id": acknowledge},
                    RELAY_TIMEOUT_MS,
                )
                entry = parse_relay_answer(answer)
            except (RelayRequestFailed, MalformedAnswer) as e:
                if acknowledge:
                    # It may or may not have been deleted: acknowledge it again.
                    self._unacknowledged[relay] = acknowledge
                return self._failed(relay, done, f"relay_txn failed: {e}")
            if entry is None:
                return done
            if entry.entry_id in handed_out:
                return self._failed(
                    relay,
                    done,
                    f"the relay handed out entry {entry.entry_id} again after we"
                    " acknowledged it",
                )
            handed_out.add(entry.entry_id)
            self.stats.inc("collected", relay)
            try:
                verdict = await self._handle(relay, entry)
            except _Stop as e:
                return self._failed(relay, done, e.reason)
            if verdict is Verdict.PROCESSED:
                done.processed += 1
            else:
                done.rejected += 1
            self.stats.inc(verdict.value, relay)
            acknowledge = entry.entry_id

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

    async def _handle(self, relay: str, entry: RelayEntry) -> Verdict:
        """Process one entry; PROCESSED or REJECTED (acknowledge it) or raise _Stop."""
        now_ms = self._api.get_current_time_msec()
        prepared = prepare_transaction(entry.transaction, self._hs.server_name, now_ms)
        if isinstance(prepared, Refusal):
            logger.warning(
                "Refusing entry %d from relay %s, and acknowledging it: %s",
                entry.entry_id,
                relay,
                prepared.reason,
            )
            return Verdict.REJECTED
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
                "Leaving out %d EDUs of transaction %s from %s (relay %s):"
                " only Olm-encrypted to-device messages are processed when relayed",
                prepared.dropped_edus,
                prepared.txn_id,
                origin,
                relay,
            )
            self.stats.inc("edus_dropped", relay, prepared.dropped_edus)

        key = (relay, origin, prepared.txn_id)
        try:
            outcome = await self._feed(relay, prepared)
        except _Stop as e:
            return await self._transient(key, entry, e)
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
            return Verdict.REJECTED
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
        logger.info(
            "Processed transaction %s from %s (entry %d from relay %s): %d PDUs"
            " accepted, %d rejected, %d EDUs",
            prepared.txn_id,
            origin,
            entry.entry_id,
            relay,
            len(outcome.accepted),
            len(outcome.rejected),
            len(prepared.body["edus"]),
        )
        return Verdict.PROCESSED

    async def _feed(self, relay: str, prepared: Prepared) -> FeedOutcome:
        """Feed a transaction to Synapse and wait until its PDUs are processed."""
        origin = prepared.origin
        needed = keys_needed(prepared.body["pdus"], origin)
        if needed:
            await self._ensure_keys(relay, origin, needed)
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
        await self._wait_until_processed(origin, outcome.accepted)
        return outcome

    async def _wait_until_processed(
        self, origin: str, event_ids: Collection[str]
    ) -> None:
        """Wait until Synapse has processed the staged PDUs, so that an entry is
        acknowledged only once its events are in the room (or rejected), and the
        next transaction's PDUs come after them."""
        waiting = set(event_ids)
        waited_ms = 0
        attempt = 0
        while waiting:
            try:
                waiting = await self._hs.still_staged(origin, waiting)
            except Exception as e:
                raise _Stop(f"checking Synapse's staging area failed: {e!r}") from e
            if not waiting:
                return
            if waited_ms >= PROCESSING_TIMEOUT_MS:
                raise _Stop(
                    f"Synapse has not processed {len(waiting)} PDUs after"
                    f" {waited_ms} ms",
                    counts_as_attempt=False,
                )
            delay = PROCESSING_POLL_MS[min(attempt, len(PROCESSING_POLL_MS) - 1)]
            attempt += 1
            await self._api.sleep(delay / 1000)
            waited_ms += delay

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
        if not stop.counts_as_attempt or not await self._database_answers():
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
