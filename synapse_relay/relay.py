"""The relay role: the seed's Relay Server API, as federation endpoints.

- forwarder, `PUT /_matrix/federation/v1/send_relay/{txnID}/{userID}`: a *deposit*;
  stores a transaction for the user ID's server (the destination).
- retriever, `GET /_matrix/federation/v1/relay_txn/{userID}`: a *collect*; hands the
  destination its oldest entry, after deleting the one it *acknowledges*.
- batch collect, `POST /_matrix/federation/unstable/synapse_relay/collect/{userID}`
  (DESIGN.md section 2b): the same in batches, acknowledging many entries and
  handing out up to `limit` at once, within `COLLECT_MAX_BYTES`.

All are served by Synapse's federation listener with X-Matrix authentication (see
`_synapse.servlets.mount_federation_endpoints`); `origin` below is always the
authenticated server, never a value taken from the request body.
"""

import json
import logging

from canonicaljson import encode_canonical_json
from synapse.module_api import JsonDict, ModuleApi
from synapse.module_api.errors import Codes, SynapseError

from synapse_relay._synapse import is_valid_server_name, verify_signed_by
from synapse_relay._synapse.servlets import mount_federation_endpoints
from synapse_relay.config import RelayConfig
from synapse_relay.proof import (
    TRANSACTION_FIELDS,
    BadProof,
    OriginProof,
    parse_proof,
    with_signature,
)
from synapse_relay.protocol import (
    COLLECT_DEFAULT_LIMIT,
    COLLECT_MAX_ACKNOWLEDGE,
    COLLECT_MAX_BYTES,
    COLLECT_MAX_LIMIT,
    MAX_EDUS,
    MAX_PDUS,
    ORIGIN_AUTH,
    UNSTABLE_PREFIX,
)
from synapse_relay.push import Pusher, start_pusher
from synapse_relay.stats import RoleStats
from synapse_relay.store import Entry, NewEntry, Quota, QuotaExceeded, RelayStore

logger = logging.getLogger(__name__)

# Matrix identifiers are at most 255 bytes; a transaction id is kept to the same.
MAX_ID_LENGTH = 255
MAX_ENTRY_ID = 2**63 - 1

# A registration (relay.serve_registered) is written again at most this often
# per server and process: a collection every few seconds costs no write each.
REGISTRATION_REFRESH_MS = 60 * 60 * 1000

# How often expired entries are purged: a tenth of the retention, within these.
MAX_PURGE_INTERVAL_MS = 60 * 60 * 1000
MIN_PURGE_INTERVAL_MS = 1000

Query = dict[bytes, list[bytes]]

RELAY_COUNTERS = {
    "deposits_accepted": "Transactions stored for a destination",
    "deposits_duplicate": "Deposits of a transaction already stored (answered 200)",
    "deposits_refused": "Deposits refused: origin or destination not served, quota",
    "deposits_proven": "Transactions stored with an origin proof",
    "deposits_unproven": "Transactions stored without an origin proof",
    "proofs_refused": "Deposits refused for their origin proof: not matching the"
    " request or the body (400), or not verifying (401)",
    "collects": "relay_txn and batch collect requests served to the owner of a queue",
    "collects_refused": "relay_txn and batch collect requests refused: not the owner",
    "registrations": "Servers that registered by collecting (relay.serve_registered)",
    "acknowledged": "Entries deleted because their owner acknowledged them",
    "purged": "Entries deleted because they were older than the retention",
}


def destination_of(user_id: str) -> str:
    """The server name of a user ID; 400 M_INVALID_PARAM if it is not one.

    The localpart is checked against the Matrix spec's historical grammar (printable
    ASCII but ":"), the widest any server may have issued.
    """
    localpart, _, server_name = user_id[1:].partition(":")
    if (
        not user_id.startswith("@")
        or len(user_id.encode("utf-8", errors="replace")) > MAX_ID_LENGTH
        or not localpart
        or not all("!" <= c <= "~" for c in localpart)
        or not is_valid_server_name(server_name)
    ):
        raise SynapseError(
            400,
            f"Invalid user ID {user_id!r}: expected @localpart:server",
            Codes.INVALID_PARAM,
        )
    return server_name


def validate_txn_id(txn_id: str) -> None:
    """1 to 255 bytes of printable characters (PostgreSQL TEXT cannot hold NUL)."""
    if (
        not txn_id
        or len(txn_id.encode("utf-8", errors="replace")) > MAX_ID_LENGTH
        or not txn_id.isprintable()
        or not _is_encodable(txn_id)
    ):
        raise SynapseError(
            400,
            f"Invalid transaction ID: expected 1 to {MAX_ID_LENGTH} bytes"
            " of printable characters",
            Codes.INVALID_PARAM,
        )


def _is_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return False
    return True


def build_transaction(
    content: JsonDict | None,
    *,
    origin: str,
    destination: str,
    txn_id: str,
    now_ms: int,
) -> JsonDict:
    """The transaction to store for a deposit body; 400 if the body is not one.

    Only the fields of a federation transaction are kept. `origin`, `destination`
    and `transaction_id` come from authentication and the path, never the body.
    """
    if content is None:
        raise SynapseError(
            400, "Missing body: expected a federation transaction", Codes.NOT_JSON
        )
    pdus = _object_list(content, "pdus", MAX_PDUS, required=True)
    edus = _object_list(content, "edus", MAX_EDUS, required=False)
    origin_server_ts = content.get("origin_server_ts", now_ms)
    if not isinstance(origin_server_ts, int) or isinstance(origin_server_ts, bool):
        raise SynapseError(400, "origin_server_ts must be an integer", Codes.BAD_JSON)
    return {
        "origin": origin,
        "origin_server_ts": origin_server_ts,
        "destination": destination,
        "transaction_id": txn_id,
        "pdus": pdus,
        "edus": edus,
    }


def proven_transaction(
    content: JsonDict, *, origin: str, destination: str, txn_id: str, now_ms: int
) -> tuple[JsonDict, OriginProof]:
    """T and its origin proof, for a deposit body carrying one; 400 M_INVALID_PARAM
    when the body is not exactly T's six fields and the proof, or when T does not
    name the authenticated origin, the mailbox's server and the path's
    transaction id (DESIGN.md section 2b). The signature is not checked here.

    A Dendrite-shaped body (fields missing, or others beside them) with a proof is
    refused rather than stored unproven: its sender meant it to be proven, and the
    proof cannot cover what the relay would store.
    """
    fields = set(content) - {ORIGIN_AUTH}
    if fields != TRANSACTION_FIELDS:
        missing = ", ".join(sorted(TRANSACTION_FIELDS - fields)) or "none"
        extra = ", ".join(sorted(f"{f!r:.40}" for f in fields - TRANSACTION_FIELDS))
        raise SynapseError(
            400,
            f"A deposit with {ORIGIN_AUTH} must be exactly the six fields of the"
            f" transaction and the proof: missing {missing}; unexpected"
            f" {extra or 'none'}",
            Codes.INVALID_PARAM,
        )
    try:
        proof = parse_proof(content[ORIGIN_AUTH])
    except BadProof as e:
        raise SynapseError(400, str(e), Codes.INVALID_PARAM) from e
    for field, expected in (
        ("origin", origin),
        ("destination", destination),
        ("transaction_id", txn_id),
    ):
        if content[field] != expected:
            raise SynapseError(
                400,
                f"The proven transaction's {field} is {content[field]!r:.80}, not"
                f" {expected!r}",
                Codes.INVALID_PARAM,
            )
    transaction = build_transaction(
        content, origin=origin, destination=destination, txn_id=txn_id, now_ms=now_ms
    )
    if transaction["edus"] != content["edus"]:  # only when edus was null
        raise SynapseError(400, "edus must be a list", Codes.BAD_JSON)
    return transaction, proof


def _object_list(
    content: JsonDict, key: str, maximum: int, required: bool
) -> list[JsonDict]:
    value = content.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise SynapseError(
            400,
            f"{key} must be a list of JSON objects"
            + (" and is required" if required else ""),
            Codes.BAD_JSON,
        )
    if len(value) > maximum:
        raise SynapseError(
            400, f"Too many {key}: {len(value)}, at most {maximum}", Codes.BAD_JSON
        )
    return value


def parse_entry_id(content: JsonDict | None, query: Query) -> int:
    """The acknowledged entry id, from the body or `?entry_id=`; 0 when absent."""
    values: list[int] = []
    if content is not None and "entry_id" in content:
        values.append(entry_id_value(content["entry_id"]))
    for raw in query.get(b"entry_id", []):
        text = raw.decode("utf-8", errors="replace")
        values.append(
            entry_id_value(int(text) if text.isascii() and text.isdigit() else text)
        )
    if len(set(values)) > 1:
        raise SynapseError(
            400, "entry_id given twice with different values", Codes.INVALID_PARAM
        )
    return values[0] if values else 0


def entry_id_value(value: object) -> int:
    """An entry id from a request: an integer >= 0; 400 M_INVALID_PARAM otherwise."""
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and 0 <= value <= MAX_ENTRY_ID
    ):
        return value
    raise SynapseError(
        400,
        f"entry_id must be an integer >= 0, got {json.dumps(value)}",
        Codes.INVALID_PARAM,
    )


def start_relay_role(
    config: RelayConfig, store: RelayStore, api: ModuleApi
) -> "Relay | None":
    """Serve the two endpoints and purge expired entries, if the role is enabled.

    When it is not, the endpoints are not served at all: Synapse answers as for any
    unknown federation path.
    """
    if not config.enabled:
        return None
    relay = Relay(config, store, api)
    mount_federation_endpoints(
        [SendRelayEndpoint(relay), RelayTxnEndpoint(relay), CollectEndpoint(relay)]
    )
    # Runs on the one instance that runs background tasks.
    api.looping_background_call(
        relay.purge_expired,
        purge_interval_ms(config.retention_ms),
        desc="synapse_relay_purge",
    )
    relay.pusher = start_pusher(config, store, relay.acknowledge, api)
    served = list(config.destinations)
    if config.serve_registered:
        served.append("every server that registered by collecting")
    logger.info(
        "Relay role enabled: holding mail for %s, deposits from %s",
        ", ".join(served),
        ", ".join(config.origins),
    )
    return relay


def purge_interval_ms(retention_ms: int) -> int:
    return max(MIN_PURGE_INTERVAL_MS, min(MAX_PURGE_INTERVAL_MS, retention_ms // 10))


class Relay:
    """What both endpoints share: configuration, queue store and counters."""

    def __init__(self, config: RelayConfig, store: RelayStore, api: ModuleApi) -> None:
        self.config = config
        self.store = store
        self.api = api
        self.stats = RoleStats("relay", RELAY_COUNTERS, per_relay=False)
        self.quota = Quota(
            max_transactions=config.max_transactions_per_destination,
            max_bytes=config.max_bytes_per_destination,
        )
        # Delivers proven entries itself, on the process that runs background tasks.
        self.pusher: Pusher | None = None
        # server -> when it last registered, as far as this process knows
        self._registered: dict[str, int] = {}

    async def acknowledge(self, destination: str, entry_id: int) -> bool:
        """Delete an entry of `destination` (delivered by push.py) as its owner's
        acknowledgement does; whether it was still there."""
        return await self.store.acknowledge(destination, entry_id)

    async def holds_mail_for(self, destination: str) -> bool:
        """Whether deposits for `destination` are accepted: it is listed in
        `relay.destinations`, or (`relay.serve_registered`) it registered within
        the retention."""
        if self.config.holds_mail_for(destination):
            return True
        if not self.config.serve_registered:
            return False
        since = self.api.get_current_time_msec() - self.config.retention_ms
        if self._registered.get(destination, -1) >= since:
            return True
        registered_ts = await self.store.registered_at(destination, since)
        if registered_ts is None:
            return False
        self._registered[destination] = registered_ts
        return True

    async def collected_by_owner(self, server_name: str) -> None:
        """`server_name` proved who it is by collecting (a signed request):
        with `relay.serve_registered`, it is registered."""
        if not self.config.serve_registered:
            return
        now = self.api.get_current_time_msec()
        if now - self._registered.get(server_name, -1) < REGISTRATION_REFRESH_MS:
            return
        await self.store.register(server_name, now)
        if server_name not in self._registered:
            self.stats.inc("registrations")
            logger.info("%s registered: this relay holds its mail", server_name)
        self._registered[server_name] = now

    async def owned_mailbox(self, origin: str, user_id: str) -> str:
        """The destination whose mail `user_id` names, if `origin` owns it: 400 for
        a bad user ID, 403 when `origin` is not its owner. The owner, having proved
        who it is, is registered (`collected_by_owner`)."""
        destination = destination_of(user_id)
        if origin != destination:
            self.stats.inc("collects_refused")
            logger.warning("Refused %s collecting the mail of %s", origin, destination)
            raise SynapseError(
                403, f"Only {destination} may collect its own mail", Codes.FORBIDDEN
            )
        await self.collected_by_owner(origin)
        return destination

    async def purge_expired(self) -> None:
        before = self.api.get_current_time_msec() - self.config.retention_ms
        purged = await self.store.purge_received_before(before)
        if purged:
            self.stats.inc("purged", amount=purged)
            logger.info("Purged %d relay entries older than the retention", purged)


class SendRelayEndpoint:
    """Forwarder: a server deposits a transaction for a destination."""

    PATH = "/send_relay/(?P<txn_id>[^/]*)/(?P<user_id>[^/]*)"

    def __init__(self, relay: Relay) -> None:
        self._relay = relay

    def unsigned_body_is_harmless(self, content: JsonDict) -> bool:
        return False

    async def on_PUT(
        self,
        origin: str,
        content: JsonDict | None,
        query: Query,
        txn_id: str,
        user_id: str,
    ) -> tuple[int, JsonDict]:
        relay = self._relay
        destination = destination_of(user_id)
        validate_txn_id(txn_id)
        if not relay.config.accepts_from(origin):
            self._refuse(f"This relay does not accept deposits from {origin}")
        if not await relay.holds_mail_for(destination):
            self._refuse(f"This relay does not hold mail for {destination}")
        now_ms = relay.api.get_current_time_msec()
        proof = None
        if content is not None and ORIGIN_AUTH in content:
            transaction, proof = await self._check_proof(
                content, origin=origin, destination=destination, txn_id=txn_id
            )
        else:
            transaction = build_transaction(
                content,
                origin=origin,
                destination=destination,
                txn_id=txn_id,
                now_ms=now_ms,
            )
        # Cannot fail: authentication already encoded the body canonically.
        txn_json = encode_canonical_json(transaction).decode("utf-8")
        try:
            deposit = await relay.store.deposit(
                NewEntry(
                    origin=origin,
                    txn_id=txn_id,
                    destination=destination,
                    txn_json=txn_json,
                    received_ms=now_ms,
                    origin_auth=None if proof is None else json.dumps(proof.to_json()),
                ),
                relay.quota,
            )
        except QuotaExceeded as e:
            relay.stats.inc("deposits_refused")
            logger.warning("Refused deposit %s from %s: %s", txn_id, origin, e)
            raise SynapseError(
                507, f"Quota exceeded: {e}", Codes.RESOURCE_LIMIT_EXCEEDED
            ) from e
        if deposit.duplicate:
            relay.stats.inc("deposits_duplicate")
            logger.info(
                "Transaction %s from %s for %s already stored as entry %d",
                txn_id,
                origin,
                destination,
                deposit.entry_id,
            )
        else:
            relay.stats.inc("deposits_accepted")
            relay.stats.inc("deposits_unproven" if proof is None else "deposits_proven")
            # DEBUG: Synapse's access log has a line for every deposit already
            # (path, origin, answer); a second INFO line cost 5 % of a relay's
            # deposit throughput (bench figure 2).
            logger.debug(
                "Stored transaction %s from %s for %s as entry %d (%d PDUs, %d EDUs,"
                " %s)",
                txn_id,
                origin,
                destination,
                deposit.entry_id,
                len(transaction["pdus"]),
                len(transaction["edus"]),
                "unproven" if proof is None else "proven",
            )
            if proof is not None and relay.pusher is not None:
                relay.pusher.wake(destination)
        return 200, {}

    async def _check_proof(
        self, content: JsonDict, *, origin: str, destination: str, txn_id: str
    ) -> tuple[JsonDict, OriginProof]:
        """T and its proof, checked; 400 or 401 (counted) when they do not hold.

        The signature must verify with a key of the origin valid now: the origin
        just authenticated this request over X-Matrix, so its current key is in
        Synapse's keyring already.
        """
        relay = self._relay
        now_ms = relay.api.get_current_time_msec()
        try:
            transaction, proof = proven_transaction(
                content,
                origin=origin,
                destination=destination,
                txn_id=txn_id,
                now_ms=now_ms,
            )
        except SynapseError as e:
            relay.stats.inc("proofs_refused")
            logger.warning(
                "Refused deposit %s from %s: bad origin proof: %s", txn_id, origin, e
            )
            raise
        try:
            await verify_signed_by(
                relay.api, origin, with_signature(transaction, proof), now_ms
            )
        except Exception as e:
            relay.stats.inc("proofs_refused")
            logger.warning(
                "Refused deposit %s from %s: its origin proof (%s) does not verify: %s",
                txn_id,
                origin,
                proof.key,
                e,
            )
            raise SynapseError(
                401,
                f"The origin proof does not verify with a current key of {origin}",
                Codes.UNAUTHORIZED,
            ) from e
        return transaction, proof

    def _refuse(self, message: str) -> None:
        self._relay.stats.inc("deposits_refused")
        logger.warning("Refused deposit: %s", message)
        raise SynapseError(403, message, Codes.FORBIDDEN)


class RelayTxnEndpoint:
    """Retriever: the owner of a queue collects its oldest entry, one at a time."""

    PATH = "/relay_txn/(?P<user_id>[^/]*)"

    def __init__(self, relay: Relay) -> None:
        self._relay = relay

    def unsigned_body_is_harmless(self, content: JsonDict) -> bool:
        # Only an acknowledgement deletes: a body that acknowledges nothing may be
        # dropped without harm when a client signed the request without it.
        return bool(content.get("entry_id", 0) == 0)

    async def on_GET(
        self, origin: str, content: JsonDict | None, query: Query, user_id: str
    ) -> tuple[int, JsonDict]:
        relay = self._relay
        destination = await relay.owned_mailbox(origin, user_id)
        acknowledged = parse_entry_id(content, query)
        collected = await relay.store.acknowledge_and_get_oldest(
            destination, acknowledged
        )
        relay.stats.inc("collects")
        if collected.acknowledged:
            relay.stats.inc("acknowledged")
        entry = collected.entry
        if entry is None:
            return 200, {"transaction": {}, "entry_id": 0, "entries_queued": False}
        return 200, {
            **entry_fields(entry),
            "entry_id": entry.entry_id,
            "entries_queued": True,
        }


def entry_fields(entry: Entry) -> JsonDict:
    """An entry as collect answers carry it: its transaction, and its origin proof
    when it has one."""
    fields: JsonDict = {"transaction": json.loads(entry.txn_json)}
    if entry.origin_auth is not None:
        fields[ORIGIN_AUTH] = json.loads(entry.origin_auth)
    return fields


def parse_collect_body(content: JsonDict | None) -> tuple[list[int], int]:
    """The acknowledged entry ids (without repeats) and the limit of a batch
    collect request; 400 M_INVALID_PARAM for a bad value of either. A limit above
    COLLECT_MAX_LIMIT counts as COLLECT_MAX_LIMIT."""
    content = content or {}
    limit = content.get("limit", COLLECT_DEFAULT_LIMIT)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise SynapseError(
            400,
            f"limit must be an integer >= 1, got {json.dumps(limit)}",
            Codes.INVALID_PARAM,
        )
    acknowledge = content.get("acknowledge", [])
    if not isinstance(acknowledge, list):
        raise SynapseError(
            400, "acknowledge must be a list of entry ids", Codes.INVALID_PARAM
        )
    if len(acknowledge) > COLLECT_MAX_ACKNOWLEDGE:
        raise SynapseError(
            400,
            f"Too many entry ids acknowledged: {len(acknowledge)}, at most"
            f" {COLLECT_MAX_ACKNOWLEDGE} per request",
            Codes.INVALID_PARAM,
        )
    acknowledged = list(dict.fromkeys(entry_id_value(v) for v in acknowledge))
    return acknowledged, min(limit, COLLECT_MAX_LIMIT)


class CollectEndpoint:
    """Batch collect: the owner of a queue acknowledges entries and collects the
    oldest remaining ones, many at a time."""

    PREFIX = UNSTABLE_PREFIX
    PATH = "/collect/(?P<user_id>[^/]*)"

    def __init__(self, relay: Relay) -> None:
        self._relay = relay

    def unsigned_body_is_harmless(self, content: JsonDict) -> bool:
        return False  # (a POST: its body is always signed)

    async def on_POST(
        self, origin: str, content: JsonDict | None, query: Query, user_id: str
    ) -> tuple[int, JsonDict]:
        relay = self._relay
        destination = await relay.owned_mailbox(origin, user_id)
        acknowledged, limit = parse_collect_body(content)
        batch = await relay.store.acknowledge_and_get_batch(
            destination, acknowledged, limit, COLLECT_MAX_BYTES
        )
        relay.stats.inc("collects")
        if batch.acknowledged:
            relay.stats.inc("acknowledged", amount=batch.acknowledged)
        return 200, {
            "entries": [
                {"entry_id": entry.entry_id, **entry_fields(entry)}
                for entry in batch.entries
            ],
            "entries_queued": batch.more,
        }
