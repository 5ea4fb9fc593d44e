"""What the receive role lets through of a relayed transaction, and how it reads
Synapse's answers: pure functions, no I/O (the collector, `collector.py`, does the
fetching, feeding and acknowledging).

- `parse_relay_answer`, `parse_batch_answer`: a relay_txn or batch collect answer,
  or MalformedAnswer.
- `proof_to_verify`: what to verify of an entry's origin proof (DESIGN.md 2b), or
  why it cannot be (then the entry is unproven).
- `prepare_transaction`: refuse a transaction not for us or without a usable origin;
  for an unproven one, leave out PDUs not sent by a user of the origin and EDUs a
  relay could forge (`edu_refusal`); a proven one is fed whole.
- `keys_needed`, `keys_satisfied`, `judge_offered_keys`: the origin's signing keys
  the PDUs need, and whether keys a relay's notary offers may be stored.
- `judge_feed`: Synapse's answer to a fed transaction, as a Verdict.
- `derive_txn_id`, `retry_txn_id`: the transaction ids we feed under.
"""

import base64
import hashlib
import re
from collections import Counter
from collections.abc import Mapping
from enum import Enum
from typing import Any

import attr
from canonicaljson import encode_canonical_json
from synapse.module_api import JsonDict

from synapse_relay._synapse import HeldKey, is_valid_server_name
from synapse_relay.proof import (
    BadProof,
    OriginProof,
    is_six_field_transaction,
    parse_proof,
    ts_in_window,
    with_signature,
)
from synapse_relay.protocol import MAX_EDUS, MAX_PDUS, ORIGIN_AUTH

# Unproven transactions are fed to Synapse under this prefix + the origin's
# transaction id: Synapse deduplicates by (origin, transaction id) for a day, so a
# relay that could hand us a forged transaction under the id of a future direct
# transaction of that origin would make Synapse ignore the real one. Proven ones
# are fed under the origin's own id: the origin signed it for us.
FED_TXN_ID_PREFIX = "relayed:"
# Prefix of the ids derived from the content, for relays that omit transaction_id.
DERIVED_TXN_ID_PREFIX = "derived-"

# EDUs are not signed: a relay could forge them with any origin. Only to-device
# messages that clients authenticate end to end (Olm) are processed when relayed.
RELAYED_EDU_TYPES = frozenset({"m.direct_to_device"})
RELAYED_TO_DEVICE_TYPES = frozenset({"m.room.encrypted"})
# The EDU types Synapse 1.163 handles (federation/federation_server.py and the
# handlers registering with its FederationHandlerRegistry).
KNOWN_EDU_TYPES = frozenset(
    {
        "m.typing",
        "m.receipt",
        "m.presence",
        "m.direct_to_device",
        "m.device_list_update",
        "m.signing_key_update",
        "org.matrix.signing_key_update",
    }
)

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
    # the origin proof the relay returned beside the transaction (ORIGIN_AUTH),
    # unchecked; None when it returned none
    origin_auth: Any = None


class MalformedAnswer(Exception):
    """A relay's collect answer is not what the protocol says."""


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
    return _entry(answer)


def parse_batch_answer(answer: Any) -> tuple[list[RelayEntry], bool]:
    """The entries a batch collect answer carries, in order, and whether the relay
    says more remain after them."""
    if not isinstance(answer, dict) or not isinstance(answer.get("entries"), list):
        raise MalformedAnswer("the answer is not a JSON object with a list of entries")
    more = answer.get("entries_queued")
    if not isinstance(more, bool):
        raise MalformedAnswer(f"entries_queued {more!r} is not a boolean")
    entries = []
    for entry in answer["entries"]:
        if not isinstance(entry, dict) or not isinstance(
            entry.get("transaction"), dict
        ):
            raise MalformedAnswer("an entry is not an object with a transaction")
        entries.append(_entry(entry))
    return entries, more


def _entry(fields: JsonDict) -> RelayEntry:
    entry_id = fields.get("entry_id")
    if not isinstance(entry_id, int) or isinstance(entry_id, bool) or entry_id < 1:
        raise MalformedAnswer(f"entry_id {entry_id!r} is not an integer >= 1")
    return RelayEntry(entry_id, fields["transaction"], fields.get(ORIGIN_AUTH))


@attr.s(frozen=True, auto_attribs=True)
class ProofToVerify:
    """An entry's origin proof, to be verified with a key of `origin` valid at
    `valid_at_ms` (T's origin_server_ts)."""

    origin: str
    txn_id: str
    proof: OriginProof
    valid_at_ms: int
    # the signed request object carrying the signature
    signed: JsonDict


def proof_to_verify(
    entry: RelayEntry, our_server_name: str, now_ms: int
) -> ProofToVerify | str | None:
    """What to verify of the entry's proof; None without one; why it cannot be
    verified otherwise (the entry is then unproven: never proven on the relay's
    word)."""
    if entry.origin_auth is None:
        return None
    try:
        proof = parse_proof(entry.origin_auth)
    except BadProof as e:
        return str(e)
    transaction = entry.transaction
    if not is_six_field_transaction(transaction):
        return "the transaction is not exactly the six fields a proof covers"
    origin = transaction["origin"]
    if transaction["destination"] != our_server_name:
        return f"it is destined to {transaction['destination']!r:.80}, not to us"
    if not is_valid_server_name(origin) or origin == our_server_name:
        return f"its origin {origin!r:.80} is not another server"
    if not transaction["transaction_id"]:
        return "its transaction_id is empty"
    ts: int = transaction["origin_server_ts"]
    too_far = ts_in_window(ts, now_ms)
    if too_far is not None:
        return too_far
    return ProofToVerify(
        origin=origin,
        txn_id=transaction["transaction_id"],
        proof=proof,
        valid_at_ms=ts,
        signed=with_signature(transaction, proof),
    )


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
    # (EDU type, why it was left out) -> how many
    dropped_edus: Mapping[tuple[str, str], int]
    # whether its origin proof verified: fed whole, under the origin's own id
    proven: bool = False

    @property
    def fed_txn_id(self) -> str:
        return self.txn_id if self.proven else FED_TXN_ID_PREFIX + self.txn_id


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


def edu_type_of(edu: Any) -> str:
    """An EDU's type for logs and counters: one of KNOWN_EDU_TYPES or "other" (a
    relay must not be able to grow the metrics' label set)."""
    edu_type = _str_field(edu, "edu_type")
    return edu_type if edu_type in KNOWN_EDU_TYPES else "other"


def _str_field(obj: Any, key: str) -> str | None:
    """obj[key] when obj is an object and that is a string (a relay's JSON may
    hold lists where strings belong: not hashable)."""
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if isinstance(value, str) else None


def edu_refusal(edu: Any, origin: str) -> str | None:
    """Why an EDU of an unproven relayed transaction is left out; None if it is
    processed (see RELAYED_EDU_TYPES)."""
    if _str_field(edu, "edu_type") not in RELAYED_EDU_TYPES:
        return "unproven, and a relay could forge it"
    content = edu.get("content")
    if not isinstance(content, dict) or not isinstance(content.get("messages"), dict):
        return "malformed"
    if _str_field(content, "type") not in RELAYED_TO_DEVICE_TYPES:
        return "unproven, and not Olm-encrypted"
    if server_of(content.get("sender")) != origin:
        return "its sender is not a user of the origin"
    return None


def prepare_transaction(
    transaction: Any, our_server_name: str, now_ms: int, proven: bool = False
) -> Prepared | Refusal:
    """Check a relayed transaction and build what is fed to Synapse.

    Unless its origin proof verified (`proven`), the relay's word is trusted for
    nothing that Synapse will not check: the transaction's origin must be a server
    name other than ours; every PDU fed must be sent by a user of that origin, so
    that Synapse's check of the sender server's signature proves the origin signed
    it; only end-to-end authenticated EDUs are kept. A proven transaction is fed
    whole, as if it had come directly from its origin.
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
        if proven or sender_server == origin:
            kept_pdus.append(pdu)
        else:
            event_id = pdu.get("event_id")
            dropped_pdus[event_id if isinstance(event_id, str) else "<no event_id>"] = (
                f"sent by {pdu.get('sender')!r}, not by a user of the origin {origin}"
            )
    kept_edus = []
    dropped_edus: Counter[tuple[str, str]] = Counter()
    for edu in edus:
        refusal = None if proven else edu_refusal(edu, origin)
        if refusal is None:
            kept_edus.append(edu)
        else:
            dropped_edus[(edu_type_of(edu), refusal)] += 1

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
        dropped_edus=dropped_edus,
        proven=proven,
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
