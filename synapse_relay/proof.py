"""The origin proof of a relayed transaction (DESIGN.md section 2b): pure functions.

A sender proves that a deposited transaction T comes from it by signing, with its
server signing key, exactly what it would sign for a direct `PUT /send/{txnID}` to
the destination with T as the body (`signed_request`). T is always the six-field
form the relay stores and hands out (`TRANSACTION_FIELDS`), so that the relay, the
recipient and a destination receiving T pushed by the relay all rebuild the same
signed object. The proof travels as `{"key": "ed25519:...", "sig": "..."}` under
the field name `ORIGIN_AUTH`: on the deposit body beside T's fields, and beside
`transaction` in collect answers.

Who checks what:
- the relay (relay.py) checks that T names the authenticated origin, the mailbox's
  server and the path's transaction id, and that the signature verifies with the
  origin's key valid now;
- the recipient (collector.py) verifies it again, with the origin's key valid at
  T's `origin_server_ts` (`ts_in_window`), and only then processes every EDU.
"""

from typing import Any
from urllib.parse import quote

import attr
from synapse.module_api import JsonDict

from synapse_relay.protocol import FEDERATION_PREFIX, ORIGIN_AUTH

# T: the transaction a relay stores, hands out and replays, and the proof covers.
TRANSACTION_FIELDS = frozenset(
    {"origin", "origin_server_ts", "destination", "transaction_id", "pdus", "edus"}
)

# How far in the future T's origin_server_ts may be (clock skew) for its proof to
# be verified; older than the relay's retention it cannot be either.
MAX_FUTURE_SKEW_MS = 5 * 60 * 1000
MAX_AGE_MS = 30 * 24 * 60 * 60 * 1000

# Ed25519 signature: 64 bytes, 86 characters of unpadded base64.
MAX_SIG_LENGTH = 200
MAX_KEY_ID_LENGTH = 255


@attr.s(frozen=True, auto_attribs=True)
class OriginProof:
    # the origin's key id, "ed25519:..."
    key: str
    # unpadded base64 Ed25519 signature
    sig: str

    def to_json(self) -> JsonDict:
        return {"key": self.key, "sig": self.sig}


class BadProof(ValueError):
    """A proof that is not `{"key": "ed25519:...", "sig": "..."}`."""


def parse_proof(value: Any) -> OriginProof:
    """The proof in a deposit body or a collect answer; BadProof if malformed."""
    if not isinstance(value, dict) or set(value) != {"key", "sig"}:
        raise BadProof(
            f"{ORIGIN_AUTH} must be an object with exactly the fields key and sig"
        )
    key, sig = value["key"], value["sig"]
    if (
        not isinstance(key, str)
        or not key.startswith("ed25519:")
        or len(key) > MAX_KEY_ID_LENGTH
        or not key.isprintable()
    ):
        raise BadProof(f"{ORIGIN_AUTH}.key must be an ed25519 key id, got {key!r:.80}")
    if not isinstance(sig, str) or not sig or len(sig) > MAX_SIG_LENGTH:
        raise BadProof(f"{ORIGIN_AUTH}.sig must be an unpadded base64 signature")
    return OriginProof(key=key, sig=sig)


def send_uri(txn_id: str) -> str:
    """The request path of the direct `PUT /send` of `txn_id`, as Synapse builds it
    (every byte but unreserved ones percent-encoded)."""
    return f"{FEDERATION_PREFIX}/send/{quote(txn_id, safe='')}"


def signed_request(transaction: JsonDict) -> JsonDict:
    """What the origin signs: the X-Matrix request object of `PUT /send` with the
    six-field transaction as its content (it names origin, destination and id)."""
    return {
        "method": "PUT",
        "uri": send_uri(transaction["transaction_id"]),
        "origin": transaction["origin"],
        "destination": transaction["destination"],
        "content": transaction,
    }


def with_signature(transaction: JsonDict, proof: OriginProof) -> JsonDict:
    """`signed_request` carrying the proof, for a keyring to verify."""
    request = signed_request(transaction)
    request["signatures"] = {transaction["origin"]: {proof.key: proof.sig}}
    return request


def transaction_of(body: JsonDict, destination: str, txn_id: str) -> JsonDict:
    """T for a transaction body Synapse would send directly (which omits
    `destination` and `transaction_id`, and `edus` when empty)."""
    return {
        "origin": body["origin"],
        "origin_server_ts": body["origin_server_ts"],
        "destination": destination,
        "transaction_id": txn_id,
        "pdus": body.get("pdus", []),
        "edus": body.get("edus", []),
    }


def is_six_field_transaction(transaction: Any) -> bool:
    """Whether a collected transaction is exactly a T a proof can cover."""
    return (
        isinstance(transaction, dict)
        and set(transaction) == TRANSACTION_FIELDS
        and isinstance(transaction["origin"], str)
        and isinstance(transaction["destination"], str)
        and isinstance(transaction["transaction_id"], str)
        and isinstance(transaction["origin_server_ts"], int)
        and not isinstance(transaction["origin_server_ts"], bool)
    )


def ts_in_window(origin_server_ts: int, now_ms: int) -> str | None:
    """Why a proof made at `origin_server_ts` is not verified now; None if it may be.

    The recipient verifies with the origin's key valid at `origin_server_ts`, a
    value the origin signed: bounding it keeps a proof from claiming a moment when
    an old (perhaps since compromised) key was valid, or a far future one.
    """
    if origin_server_ts > now_ms + MAX_FUTURE_SKEW_MS:
        return f"its origin_server_ts is {origin_server_ts - now_ms} ms in the future"
    if origin_server_ts < now_ms - MAX_AGE_MS:
        return f"its origin_server_ts is {now_ms - origin_server_ts} ms in the past"
    return None
