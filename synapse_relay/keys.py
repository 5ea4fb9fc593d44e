"""The key mailbox: encrypted conversations start while a server is offline.

A server keeps on each of its relays a *snapshot* of what others need to start Olm
sessions with its users, and a small *stock* of one-time keys per device; servers
that cannot reach it ask its relays instead (DESIGN.md section 2b, docs/keys.rst).
Three sides, each its own class:

- `KeyDepositor` (receive role, the key owner): periodically signs a snapshot per
  user with the server's key and uploads the changed ones, with one-time keys moved
  out of Synapse's own pool so that only the relay hands them out;
- `KeyMailbox` (relay role): checks and stores snapshots, and answers
  `/user/devices`, `/user/keys/query` and `/user/keys/claim` for the server, each
  escrowed key at most once, then the device's fallback key;
- `KeyFallback` (send role side, every process): answers Synapse's own key
  requests to an unreachable server from its relays, after checking the owner's
  signature on every snapshot and the device's on every key.

A snapshot (signed JSON, signed by its server)::

    {"user_id": ..., "stream_id": ..., "devices": [{"device_id", "keys", ...}],
     "master_key": ..., "self_signing_key": ..., (both optional)
     "fallback_keys": {device_id: {"signed_curve25519:ID": {...}}},
     "ts": ms, "signatures": {server_name: {...}}}

Its first fields are the owner's own `/user/devices/{userId}` answer.
"""

import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

import attr
from canonicaljson import encode_canonical_json
from prometheus_client import Gauge
from signedjson.key import decode_verify_key_bytes
from signedjson.sign import SignatureVerifyException, verify_signed_json
from synapse.module_api import JsonDict, ModuleApi
from synapse.module_api.errors import Codes, SynapseError
from unpaddedbase64 import decode_base64

from synapse_relay._synapse import keyed_lock
from synapse_relay._synapse.keys import (
    ALGORITHM,
    KeyRelayClient,
    KeyRequest,
    LocalKeys,
    RelayUnusable,
    ServerSignatures,
    intercept_key_requests,
    query_destinations_with_relays,
)
from synapse_relay._synapse.servlets import mount_federation_endpoints
from synapse_relay.config import (
    MAX_ESCROWED_ONE_TIME_KEYS,
    ReceiveConfig,
    RelayConfig,
)
from synapse_relay.protocol import KEY_SNAPSHOTS, KEYS_PREFIX, keys_path
from synapse_relay.relay import destination_of
from synapse_relay.sender import RelayDirectory
from synapse_relay.stats import RoleStats
from synapse_relay.store import (
    EscrowedKey,
    KeyQuota,
    KeySnapshot,
    QuotaExceeded,
    RelayStore,
    Stock,
)

logger = logging.getLogger(__name__)

# What one upload, snapshot or request may hold (a bad or hostile peer cannot make
# a relay store or scan more).
MAX_SNAPSHOTS_PER_UPLOAD = 50
MAX_DEVICES_PER_USER = 200
MAX_SNAPSHOT_BYTES = 256 * 1024
MAX_USERS_PER_QUERY = 1000
MAX_DEVICES_PER_CLAIM = 100
# A snapshot signed this far in the future is refused (clock skew allowance).
MAX_FUTURE_MS = 5 * 60 * 1000
# Claims per claiming server per minute, per relay process.
CLAIMS_PER_MINUTE = 300
# How long a relay has to answer a key request.
RELAY_TIMEOUT_MS = 10_000

MAILBOX_COUNTERS = {
    "snapshots_stored": "Key snapshots stored for their owner",
    "uploads_refused": "Key uploads refused (bad signature, input or quota)",
    "one_time_keys_escrowed": "One-time keys received into escrow",
    "one_time_keys_claimed": "Escrowed one-time keys handed out",
    "fallback_keys_claimed": "Fallback keys handed out (no one-time key left)",
    "claims_refused": "Key claims refused (unknown keys, too many, rate limit)",
}
DEPOSIT_COUNTERS = {
    "snapshots_uploaded": "Key snapshots of our users uploaded to a relay",
    "one_time_keys_escrowed": "One-time keys moved from our pool to a relay",
    "upload_failures": "Key uploads to a relay that failed",
}
USE_COUNTERS = {
    "requests_answered": "Key requests to an unreachable server answered by a relay",
    "keys_claimed": "One-time or fallback keys of an unreachable server claimed",
    "snapshots_refused": "Snapshots from a relay refused (bad signature or content)",
}


_STOCK_LEFT = Gauge(
    "synapse_relay_receive_keys_stock_left",
    "One-time keys of our devices left in escrow on a relay (last refresh)",
    ("relay",),
)


class DepositStats(RoleStats):
    """The owner's counters, and the escrow stock left on each relay."""

    def __init__(self) -> None:
        super().__init__("receive_keys", DEPOSIT_COUNTERS, per_relay=True)
        self.stock_left: dict[str, int] = {}

    def set_stock_left(self, relay: str, keys: int) -> None:
        self.stock_left[relay] = keys
        _STOCK_LEFT.labels(relay=relay).set(keys)

    def snapshot(self) -> dict[str, object]:
        return {**super().snapshot(), "stock_left": dict(self.stock_left)}


def _fail(code: int, message: str, errcode: str = Codes.BAD_JSON) -> SynapseError:
    return SynapseError(code, message, errcode)


def _object(value: object, what: str) -> JsonDict:
    if not isinstance(value, dict):
        raise _fail(400, f"{what} must be a JSON object")
    return value


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 255:
        raise _fail(400, f"{what} must be a string of 1 to 255 characters")
    return value


def _device_signed(obj: JsonDict, user_id: str, device_id: str, key: str) -> bool:
    """Whether `obj` carries `user_id`'s signature with device `device_id`'s
    ed25519 key `key` (unpadded base64)."""
    try:
        verify_key = decode_verify_key_bytes(f"ed25519:{device_id}", decode_base64(key))
        verify_signed_json(obj, user_id, verify_key)
    except (SignatureVerifyException, ValueError, TypeError, KeyError, AttributeError):
        return False
    return True


@attr.s(frozen=True, auto_attribs=True)
class Snapshot:
    """A snapshot whose content was checked (not its owner's signature)."""

    json: JsonDict
    user_id: str
    ts: int
    # device ID -> its ed25519 key; devices without keys are not listed
    device_keys: Mapping[str, str]

    def answer_devices(self) -> JsonDict:
        """The owner's `/user/devices/{userId}` answer."""
        answer = {
            field: self.json[field]
            for field in ("user_id", "stream_id", "devices") + CROSS_SIGNING_FIELDS
            if field in self.json
        }
        return answer

    def device_keys_of(self, device_ids: Iterable[str]) -> dict[str, JsonDict]:
        wanted = set(device_ids)
        return {
            d["device_id"]: d["keys"]
            for d in self.json["devices"]
            if "keys" in d and (not wanted or d["device_id"] in wanted)
        }

    def fallback_key(self, device_id: str, algorithm: str) -> tuple[str, JsonDict]:
        for key_id, key in self.json["fallback_keys"].get(device_id, {}).items():
            if key_id.startswith(f"{algorithm}:"):
                return key_id, key
        raise KeyError(device_id)

    def signed_by_device(self, device_id: str, key: JsonDict) -> bool:
        ed25519 = self.device_keys.get(device_id)
        return ed25519 is not None and _device_signed(
            key, self.user_id, device_id, ed25519
        )


CROSS_SIGNING_FIELDS = ("master_key", "self_signing_key")


def parse_snapshot(server_name: str, value: object) -> Snapshot:
    """Check a snapshot's content; 400 (403 for another server's user) if bad.

    Every device's keys must be signed by that device's own ed25519 key, and every
    fallback key by its device: a relay cannot make a device up without a snapshot
    signature, nor swap a key of a listed device without breaking the device's.
    """
    snapshot = _object(value, "A snapshot")
    size = len(encode_canonical_json(snapshot))
    if size > MAX_SNAPSHOT_BYTES:
        raise _fail(
            413,
            f"Snapshot of {size} bytes, at most {MAX_SNAPSHOT_BYTES}",
            Codes.TOO_LARGE,
        )
    user_id = _text(snapshot.get("user_id"), "user_id")
    if destination_of(user_id) != server_name:
        raise _fail(403, f"{user_id} is not a user of {server_name}", Codes.FORBIDDEN)
    ts = snapshot.get("ts")
    if not isinstance(ts, int) or isinstance(ts, bool) or ts < 0:
        raise _fail(400, "ts must be an integer >= 0")
    if not isinstance(snapshot.get("stream_id"), int):
        raise _fail(400, "stream_id must be an integer")
    devices = snapshot.get("devices")
    if not isinstance(devices, list) or len(devices) > MAX_DEVICES_PER_USER:
        raise _fail(400, f"devices must be a list of at most {MAX_DEVICES_PER_USER}")
    device_keys: dict[str, str] = {}
    seen: set[str] = set()
    for device in devices:
        device = _object(device, "A device")
        device_id = _text(device.get("device_id"), "device_id")
        if device_id in seen:
            raise _fail(400, f"Device {device_id} listed twice")
        seen.add(device_id)
        if "keys" in device:
            device_keys[device_id] = _check_device_keys(
                user_id, device_id, device["keys"]
            )
    for field in CROSS_SIGNING_FIELDS:
        if field in snapshot:
            key = _object(snapshot[field], field)
            if key.get("user_id") != user_id:
                raise _fail(400, f"{field} is not {user_id}'s")
    fallback_keys = _object(snapshot.get("fallback_keys", {}), "fallback_keys")
    parsed = Snapshot(
        json={**snapshot, "fallback_keys": fallback_keys},
        user_id=user_id,
        ts=ts,
        device_keys=device_keys,
    )
    for device_id, keys in fallback_keys.items():
        for key_id, key in _object(keys, "fallback keys of a device").items():
            _check_one_time_key(parsed, device_id, key_id, key, "fallback key")
    return parsed


def _check_device_keys(user_id: str, device_id: str, value: object) -> str:
    keys = _object(value, "Device keys")
    ed25519 = _object(keys.get("keys"), "Device keys' keys").get(f"ed25519:{device_id}")
    if (
        keys.get("user_id") != user_id
        or keys.get("device_id") != device_id
        or not isinstance(ed25519, str)
    ):
        raise _fail(400, f"Keys of device {device_id} are not {user_id}'s")
    if not _device_signed(keys, user_id, device_id, ed25519):
        raise _fail(
            400,
            f"Keys of {user_id}'s device {device_id} are not signed by that device",
            Codes.INVALID_SIGNATURE,
        )
    return ed25519


def _check_one_time_key(
    snapshot: Snapshot, device_id: str, key_id: str, value: object, what: str
) -> JsonDict:
    key = _object(value, what)
    if not key_id.startswith(f"{ALGORITHM}:") or len(key_id) > 255:
        raise _fail(400, f"Only {ALGORITHM} keys are kept, not {key_id!r}")
    if not snapshot.signed_by_device(device_id, key):
        raise _fail(
            400,
            f"The {what} {key_id} is not signed by {snapshot.user_id}'s device"
            f" {device_id} (or the device has no keys in the snapshot)",
            Codes.INVALID_SIGNATURE,
        )
    return key


def snapshot_content_digest(content: JsonDict) -> str:
    return hashlib.sha256(encode_canonical_json(content)).hexdigest()


# --- relay role ---------------------------------------------------------------


class KeyMailbox:
    """The relay role's key mailbox: what its endpoints share."""

    def __init__(
        self,
        config: RelayConfig,
        store: RelayStore,
        api: ModuleApi,
        holds_mail_for: Callable[[str], Awaitable[bool]],
    ) -> None:
        self._config = config
        self._store = store
        self._api = api
        self._holds_mail_for = holds_mail_for
        self._signatures = ServerSignatures(api)
        self._quota = KeyQuota(
            max_users=config.max_key_users_per_destination,
            max_stock_per_device=MAX_ESCROWED_ONE_TIME_KEYS,
        )
        self._claims: dict[str, list[int]] = {}
        self._upload_lock = keyed_lock(api, "synapse_relay_key_upload")
        self.stats = RoleStats("relay_keys", MAILBOX_COUNTERS, per_relay=False)

    def endpoints(self) -> list[object]:
        return [
            _Endpoint("/(?P<server_name>[^/]*)/upload", post=self.upload),
            _Endpoint("/(?P<server_name>[^/]*)/stock", get=self.stock),
            _Endpoint(
                "/(?P<server_name>[^/]*)/user/devices/(?P<user_id>[^/]*)",
                get=self.user_devices,
            ),
            _Endpoint("/(?P<server_name>[^/]*)/user/keys/query", post=self.query),
            _Endpoint("/(?P<server_name>[^/]*)/user/keys/claim", post=self.claim),
        ]

    async def _held(self, server_name: str) -> None:
        if not await self._holds_mail_for(server_name):
            raise _fail(
                404, f"This relay holds no keys of {server_name}", Codes.NOT_FOUND
            )

    async def _owner(self, origin: str, server_name: str) -> None:
        await self._held(server_name)
        if origin != server_name:
            raise _fail(
                403, f"Only {server_name} may manage its keys here", Codes.FORBIDDEN
            )

    async def upload(
        self, origin: str, content: JsonDict | None, server_name: str
    ) -> JsonDict:
        """Store the owner's snapshots and escrow its one-time keys: all or nothing."""
        try:
            await self._owner(origin, server_name)
            snapshots, keys = await self._parse_upload(server_name, content)
            async with self._upload_lock(server_name):
                replaced = await self._store.store_key_snapshots(
                    server_name,
                    snapshots,
                    keys,
                    self._quota,
                    self._api.get_current_time_msec(),
                )
        except QuotaExceeded as e:
            self.stats.inc("uploads_refused")
            logger.warning("Refused keys of %s: %s", server_name, e)
            raise _fail(
                507, f"Quota exceeded: {e}", Codes.RESOURCE_LIMIT_EXCEEDED
            ) from e
        except SynapseError as e:
            self.stats.inc("uploads_refused")
            logger.warning("Refused keys from %s: %s", origin, e.msg)
            raise
        self.stats.inc("snapshots_stored", amount=replaced)
        self.stats.inc("one_time_keys_escrowed", amount=len(keys))
        return {"replaced": replaced}

    async def _parse_upload(
        self, server_name: str, content: JsonDict | None
    ) -> tuple[list[KeySnapshot], list[EscrowedKey]]:
        body = _object(content, "The body")
        raw = body.get("snapshots")
        if not isinstance(raw, list) or len(raw) > MAX_SNAPSHOTS_PER_UPLOAD:
            raise _fail(
                400, f"snapshots must be a list of at most {MAX_SNAPSHOTS_PER_UPLOAD}"
            )
        now = self._api.get_current_time_msec()
        parsed: dict[str, Snapshot] = {}
        for value in raw:
            snapshot = parse_snapshot(server_name, value)
            if snapshot.user_id in parsed:
                raise _fail(400, f"Two snapshots of {snapshot.user_id}")
            if snapshot.ts > now + MAX_FUTURE_MS:
                raise _fail(
                    400, f"The snapshot of {snapshot.user_id} is from the future"
                )
            parsed[snapshot.user_id] = snapshot
        for snapshot in parsed.values():
            try:
                await self._signatures.verify(server_name, snapshot.json, snapshot.ts)
            except SynapseError as e:
                raise _fail(
                    400,
                    f"The snapshot of {snapshot.user_id} is not signed by"
                    f" {server_name}: {e.msg}",
                    Codes.INVALID_SIGNATURE,
                ) from e
        keys = []
        for user_id, devices in _object(
            body.get("one_time_keys", {}), "one_time_keys"
        ).items():
            owner = parsed.get(user_id)
            if owner is None:
                raise _fail(
                    400, f"One-time keys of {user_id} come without a snapshot of them"
                )
            for device_id, device_keys in _object(devices, "one_time_keys").items():
                device_keys = _object(device_keys, "one-time keys of a device")
                if len(device_keys) > MAX_ESCROWED_ONE_TIME_KEYS:
                    raise _fail(
                        400, f"At most {MAX_ESCROWED_ONE_TIME_KEYS} keys per device"
                    )
                for key_id, key in device_keys.items():
                    key = _check_one_time_key(
                        owner, device_id, key_id, key, "one-time key"
                    )
                    algorithm, _, bare_id = key_id.partition(":")
                    keys.append(
                        EscrowedKey(
                            user_id=user_id,
                            device_id=device_id,
                            algorithm=algorithm,
                            key_id=bare_id,
                            key_json=encode_canonical_json(key).decode("utf-8"),
                        )
                    )
        return [
            KeySnapshot(
                user_id=s.user_id,
                ts=s.ts,
                snapshot_json=encode_canonical_json(s.json).decode("utf-8"),
                device_ids=frozenset(d["device_id"] for d in s.json["devices"]),
            )
            for s in parsed.values()
        ], keys

    async def stock(
        self, origin: str, content: JsonDict | None, server_name: str
    ) -> JsonDict:
        """For the owner: the users held and the one-time keys left per device."""
        await self._owner(origin, server_name)
        users, stock = await self._store.key_holdings(server_name)
        return {"users": users, "one_time_key_counts": stock}

    async def _snapshots(
        self, server_name: str, user_ids: list[str]
    ) -> dict[str, JsonDict]:
        stored = await self._store.key_snapshots(server_name, user_ids)
        return {user_id: json.loads(text) for user_id, text in stored.items()}

    async def user_devices(
        self, origin: str, content: JsonDict | None, server_name: str, user_id: str
    ) -> JsonDict:
        await self._held(server_name)
        self._user_of(server_name, user_id)
        snapshots = await self._snapshots(server_name, [user_id])
        if user_id not in snapshots:
            raise _fail(404, f"No keys of {user_id} here", Codes.NOT_FOUND)
        snapshot = Snapshot(snapshots[user_id], user_id, 0, {})
        return {**snapshot.answer_devices(), KEY_SNAPSHOTS: snapshots}

    @staticmethod
    def _user_of(server_name: str, user_id: object) -> str:
        user_id = _text(user_id, "A user ID")
        if destination_of(user_id) != server_name:
            raise _fail(
                400, f"{user_id} is not a user of {server_name}", Codes.INVALID_PARAM
            )
        return user_id

    async def query(
        self, origin: str, content: JsonDict | None, server_name: str
    ) -> JsonDict:
        await self._held(server_name)
        wanted = _object(_object(content, "The body").get("device_keys"), "device_keys")
        if len(wanted) > MAX_USERS_PER_QUERY:
            raise _fail(400, f"At most {MAX_USERS_PER_QUERY} users per query")
        for user_id, device_ids in wanted.items():
            self._user_of(server_name, user_id)
            if not isinstance(device_ids, list) or not all(
                isinstance(d, str) for d in device_ids
            ):
                raise _fail(400, f"Devices of {user_id} must be a list of device IDs")
        snapshots = await self._snapshots(server_name, list(wanted))
        return {**answer_query(wanted, snapshots), KEY_SNAPSHOTS: snapshots}

    async def claim(
        self, origin: str, content: JsonDict | None, server_name: str
    ) -> JsonDict:
        await self._held(server_name)
        try:
            wanted = parse_claim(server_name, content)
            self._rate_limit(origin, len(wanted))
            snapshots = await self._snapshots(
                server_name, sorted({user_id for user_id, _, _ in wanted})
            )
            known = [
                (user_id, device_id, algorithm)
                for user_id, device_id, algorithm in wanted
                if any(
                    d["device_id"] == device_id and "keys" in d
                    for d in snapshots.get(user_id, {}).get("devices", [])
                )
            ]
            if not known:
                raise _fail(
                    404,
                    "None of the claimed devices has keys here",
                    Codes.NOT_FOUND,
                )
        except SynapseError:
            self.stats.inc("claims_refused")
            raise
        claimed = await self._store.claim_escrowed_keys(server_name, known)
        answer: dict[str, dict[str, dict[str, JsonDict]]] = {}
        for user_id, device_id, algorithm in known:
            got = claimed.get((user_id, device_id, algorithm))
            if got is not None:
                key_id, key_json = f"{algorithm}:{got[0]}", json.loads(got[1])
                self.stats.inc("one_time_keys_claimed")
            else:
                snapshot = Snapshot(snapshots[user_id], user_id, 0, {})
                try:
                    key_id, key_json = snapshot.fallback_key(device_id, algorithm)
                except KeyError:
                    continue
                self.stats.inc("fallback_keys_claimed")
            answer.setdefault(user_id, {}).setdefault(device_id, {})[key_id] = key_json
        logger.info(
            "%s claimed keys of %d devices of %s (%d one-time keys)",
            origin,
            len(known),
            server_name,
            len(claimed),
        )
        return {
            "one_time_keys": answer,
            KEY_SNAPSHOTS: {u: snapshots[u] for u in answer},
        }

    def _rate_limit(self, origin: str, devices: int) -> None:
        now = self._api.get_current_time_msec()
        recent = [t for t in self._claims.get(origin, []) if t > now - 60_000]
        if len(recent) + devices > CLAIMS_PER_MINUTE:
            self._claims[origin] = recent
            raise SynapseError(
                429,
                f"Too many key claims from {origin}: at most {CLAIMS_PER_MINUTE}"
                " devices a minute",
                Codes.LIMIT_EXCEEDED,
            )
        self._claims[origin] = recent + [now] * devices


def answer_query(
    wanted: Mapping[str, Sequence[str]], snapshots: Mapping[str, JsonDict]
) -> JsonDict:
    """A `/user/keys/query` answer from (checked or stored) snapshots."""
    answer: JsonDict = {"device_keys": {}, "master_keys": {}, "self_signing_keys": {}}
    for user_id, device_ids in wanted.items():
        snapshot = snapshots.get(user_id)
        if snapshot is None:
            continue
        answer["device_keys"][user_id] = Snapshot(
            snapshot, user_id, 0, {}
        ).device_keys_of(device_ids)
        for field in CROSS_SIGNING_FIELDS:
            if field in snapshot:
                answer[f"{field}s"][user_id] = snapshot[field]
    return answer


def parse_claim(
    server_name: str, content: JsonDict | None
) -> list[tuple[str, str, str]]:
    """(user, device, algorithm) of a claim body, stable (`device: algorithm`) or
    unstable (`device: [algorithms]`) shape, each once."""
    wanted: list[tuple[str, str, str]] = []
    body = _object(content, "The body")
    for user_id, devices in _object(body.get("one_time_keys"), "one_time_keys").items():
        KeyMailbox._user_of(server_name, user_id)
        for device_id, algorithms in _object(devices, "Devices claimed").items():
            _text(device_id, "A device ID")
            if isinstance(algorithms, str):
                algorithms = [algorithms]
            if not isinstance(algorithms, list) or not all(
                isinstance(a, str) and a for a in algorithms
            ):
                raise _fail(400, "Algorithms must be strings")
            for algorithm in dict.fromkeys(algorithms):
                wanted.append((user_id, device_id, algorithm))
    if len(wanted) > MAX_DEVICES_PER_CLAIM:
        raise _fail(
            400,
            f"Too many keys claimed at once: {len(wanted)}, at most"
            f" {MAX_DEVICES_PER_CLAIM}",
        )
    return wanted


class _Endpoint:
    """One key-mailbox endpoint, in the servlet idiom of `_synapse.servlets`."""

    PREFIX = KEYS_PREFIX

    def __init__(self, path: str, get: Any = None, post: Any = None) -> None:
        self.PATH = path
        if get is not None:
            self.on_GET = self._wrap(get)
        if post is not None:
            self.on_POST = self._wrap(post)

    @staticmethod
    def _wrap(handler: Any) -> Any:
        async def serve(
            origin: str, content: JsonDict | None, query: object, **path_args: str
        ) -> tuple[int, JsonDict]:
            return 200, await handler(origin, content, **path_args)

        return serve

    def unsigned_body_is_harmless(self, content: JsonDict) -> bool:
        return True


# --- receive role: the key owner ------------------------------------------------


class KeyDepositor:
    """Keeps our users' keys current on each of our relays.

    Every `key_upload_interval` (and soon after start-up), per relay: ask what the
    relay holds (`stock`), build each local user's snapshot, and upload those that
    changed since the last successful upload to that relay, or that the relay does
    not hold, with one-time keys to bring each device's escrow back to
    `escrowed_one_time_keys`. Users the relay holds but who no longer have keys
    here get a snapshot without devices (their escrow goes with it). One-time keys
    taken from Synapse's pool for an upload that failed are kept for the next one.
    """

    def __init__(self, config: ReceiveConfig, api: ModuleApi) -> None:
        self._config = config
        self._api = api
        self._local = LocalKeys(api)
        self._signatures = ServerSignatures(api)
        self._client = KeyRelayClient(api)
        # relay -> user -> digest of the snapshot content the relay has
        self._uploaded: dict[str, dict[str, str]] = {}
        # relay -> user -> device -> key ID -> key: taken, not yet uploaded
        self._pending: dict[str, dict[str, dict[str, dict[str, JsonDict]]]] = {}
        self._running = False
        self.stats = DepositStats()

    async def deposit_all(self) -> None:
        if self._running:
            return
        self._running = True
        try:
            contents = await self._local_contents()
            for relay in self._config.relays:
                try:
                    await self._deposit(relay, contents)
                except RelayUnusable as e:
                    self.stats.inc("upload_failures", relay)
                    logger.warning("Could not refresh our keys on %s: %s", relay, e)
        finally:
            self._running = False

    async def _local_contents(self) -> dict[str, JsonDict]:
        """user ID -> the unsigned content of their snapshot."""
        contents = {}
        for user_id in await self._local.users_with_keys():
            devices = await self._local.user_devices(user_id)
            content = {
                field: devices[field]
                for field in ("user_id", "stream_id", "devices") + CROSS_SIGNING_FIELDS
                if devices.get(field) is not None
            }
            content["fallback_keys"] = await self._local.fallback_keys(user_id)
            contents[user_id] = content
        return contents

    async def _deposit(self, relay: str, contents: dict[str, JsonDict]) -> None:
        server_name = self._api.server_name
        held = await self._client.get(
            relay, keys_path(server_name, "/stock"), RELAY_TIMEOUT_MS
        )
        held_users, stock = _holdings(held)
        contents = dict(contents)
        for user_id in held_users:
            contents.setdefault(
                user_id,
                {
                    "user_id": user_id,
                    "stream_id": 0,
                    "devices": [],
                    "fallback_keys": {},
                },
            )
        uploaded = self._uploaded.setdefault(relay, {})
        pending = self._pending.setdefault(relay, {})
        await self._take_keys(relay, contents, stock, pending)
        changed = [
            user_id
            for user_id, content in contents.items()
            if user_id in pending
            or user_id not in held_users
            or uploaded.get(user_id) != snapshot_content_digest(content)
        ]
        stock_left = sum(
            count
            for devices in stock.values()
            for algorithms in devices.values()
            for count in algorithms.values()
        )
        for start in range(0, len(changed), MAX_SNAPSHOTS_PER_UPLOAD):
            batch = changed[start : start + MAX_SNAPSHOTS_PER_UPLOAD]
            now = self._api.get_current_time_msec()
            body = {
                "snapshots": [
                    self._signatures.sign({**contents[u], "ts": now}) for u in batch
                ],
                "one_time_keys": {u: pending[u] for u in batch if u in pending},
            }
            await self._client.post(
                relay, keys_path(server_name, "/upload"), body, RELAY_TIMEOUT_MS
            )
            escrowed = sum(
                len(keys) for u in batch for keys in pending.pop(u, {}).values()
            )
            for user_id in batch:
                uploaded[user_id] = snapshot_content_digest(contents[user_id])
            self.stats.inc("snapshots_uploaded", relay, len(batch))
            self.stats.inc("one_time_keys_escrowed", relay, escrowed)
            stock_left += escrowed
            logger.info(
                "Uploaded key snapshots of %d users to %s (%d one-time keys escrowed)",
                len(batch),
                relay,
                escrowed,
            )
        self.stats.set_stock_left(relay, stock_left)

    async def _take_keys(
        self,
        relay: str,
        contents: dict[str, JsonDict],
        stock: Stock,
        pending: dict[str, dict[str, dict[str, JsonDict]]],
    ) -> None:
        """Move one-time keys from Synapse's pool into `pending` for each device
        whose escrow on `relay` is below the target."""
        target = self._config.escrowed_one_time_keys
        wanted = []
        for user_id, content in contents.items():
            for device in content["devices"]:
                if "keys" not in device:
                    continue
                device_id = device["device_id"]
                have = stock.get(user_id, {}).get(device_id, {}).get(ALGORITHM, 0)
                have += len(pending.get(user_id, {}).get(device_id, {}))
                if have < target:
                    wanted.append((user_id, device_id, target - have))
        if not wanted:
            return
        taken = await self._local.take_one_time_keys(wanted)
        for user_id, devices in taken.items():
            for device_id, keys in devices.items():
                pending.setdefault(user_id, {}).setdefault(device_id, {}).update(keys)


def _holdings(held: object) -> tuple[dict[str, object], Stock]:
    """The users and stock in a relay's `stock` answer; RelayUnusable if it is not
    one (a relay is not trusted to answer well-formed JSON)."""
    users = held.get("users") if isinstance(held, dict) else None
    stock = held.get("one_time_key_counts") if isinstance(held, dict) else None
    if not (
        isinstance(users, dict)
        and isinstance(stock, dict)
        and all(
            isinstance(devices, dict)
            and all(
                isinstance(algorithms, dict)
                and all(isinstance(n, int) for n in algorithms.values())
                for algorithms in devices.values()
            )
            for devices in stock.values()
        )
    ):
        raise RelayUnusable("malformed stock answer")
    return users, stock


def start_key_deposits(config: ReceiveConfig, api: ModuleApi) -> KeyDepositor | None:
    """Keep our keys on our relays, from the instance that runs background tasks."""
    if not config.relays or not config.key_upload_interval_ms:
        return None
    depositor = KeyDepositor(config, api)
    api.looping_background_call(
        depositor.deposit_all,
        config.key_upload_interval_ms,
        desc="synapse_relay_key_deposits",
    )
    if api.should_run_background_tasks():
        # The first refresh soon after start-up rather than a whole interval later
        # (a delayed call, unlike a looping one, runs on every process).
        api.delayed_background_call(
            min(config.key_upload_interval_ms, 2000),
            depositor.deposit_all,
            desc="synapse_relay_key_deposits",
        )
    return depositor


# --- send role side: using an unreachable server's keys -------------------------


class KeyFallback:
    """Answers Synapse's key requests to an unreachable server from its relays.

    Nothing a relay says is taken on its word: every snapshot must carry its
    server's signature (with a key valid at the snapshot's time) and pass
    `parse_snapshot`, and every claimed key must be signed by its device as listed
    in such a snapshot. Answers are rebuilt from the checked snapshots.
    """

    def __init__(self, directory: RelayDirectory, api: ModuleApi) -> None:
        self._directory = directory
        self._api = api
        self._signatures = ServerSignatures(api)
        self._client = KeyRelayClient(api)
        self.stats = RoleStats("send_keys", USE_COUNTERS, per_relay=True)

    async def has_relays(self, destination: str) -> bool:
        return bool(await self._directory.relays_for(destination))

    async def answer(self, request: KeyRequest, failure: Exception) -> JsonDict | None:
        destination = request.destination
        for relay in await self._directory.relays_for(destination):
            try:
                answer = await self._ask(relay, request)
            except (RelayUnusable, SynapseError) as e:
                logger.info(
                    "Relay %s has no usable keys of %s: %s", relay, destination, e
                )
                continue
            self.stats.inc("requests_answered", relay)
            logger.info(
                "%s is unreachable (%s): answered its %s request from relay %s",
                destination,
                failure,
                request.kind,
                relay,
            )
            return answer
        return None

    async def _ask(self, relay: str, request: KeyRequest) -> JsonDict:
        destination = request.destination
        if request.kind == "devices":
            assert request.user_id is not None
            raw = await self._client.get(
                relay,
                keys_path(destination, "/user/devices/")
                + quote(request.user_id, safe=""),
                RELAY_TIMEOUT_MS,
            )
            snapshots = await self._checked(relay, destination, raw)
            snapshot = snapshots.get(request.user_id)
            if snapshot is None:
                raise RelayUnusable(f"no valid snapshot of {request.user_id}")
            return snapshot.answer_devices()
        path = "/user/keys/query" if request.kind == "query" else "/user/keys/claim"
        raw = await self._client.post(
            relay, keys_path(destination, path), request.body, RELAY_TIMEOUT_MS
        )
        snapshots = await self._checked(relay, destination, raw)
        if request.kind == "query":
            wanted = _object(request.body.get("device_keys"), "device_keys")
            return answer_query(wanted, {u: s.json for u, s in snapshots.items()})
        return {"one_time_keys": self._checked_keys(relay, raw, snapshots)}

    async def _checked(
        self, relay: str, destination: str, raw: JsonDict
    ) -> dict[str, Snapshot]:
        checked = {}
        for user_id, value in _object(
            raw.get(KEY_SNAPSHOTS, {}), KEY_SNAPSHOTS
        ).items():
            try:
                snapshot = parse_snapshot(destination, value)
                if snapshot.user_id != user_id:
                    raise _fail(400, f"snapshot of {snapshot.user_id} as {user_id}'s")
                await self._signatures.verify(destination, snapshot.json, snapshot.ts)
            except Exception as e:
                self.stats.inc("snapshots_refused", relay)
                logger.warning(
                    "Refused a snapshot of %s's keys from relay %s: %s",
                    user_id,
                    relay,
                    e,
                )
                continue
            checked[user_id] = snapshot
        return checked

    def _checked_keys(
        self, relay: str, raw: JsonDict, snapshots: Mapping[str, Snapshot]
    ) -> dict[str, dict[str, dict[str, JsonDict]]]:
        result: dict[str, dict[str, dict[str, JsonDict]]] = {}
        for user_id, devices in _object(raw.get("one_time_keys", {}), "keys").items():
            snapshot = snapshots.get(user_id)
            for device_id, keys in _object(devices, "keys").items():
                for key_id, key in _object(keys, "keys").items():
                    if (
                        snapshot is None
                        or not isinstance(key, dict)
                        or not (snapshot.signed_by_device(device_id, key))
                    ):
                        self.stats.inc("snapshots_refused", relay)
                        logger.warning(
                            "Relay %s gave key %s of %s/%s without a valid"
                            " signature: dropped",
                            relay,
                            key_id,
                            user_id,
                            device_id,
                        )
                        continue
                    result.setdefault(user_id, {}).setdefault(device_id, {})[key_id] = (
                        key
                    )
                    self.stats.inc("keys_claimed", relay)
        return result


def start_key_fallback(directory: RelayDirectory, api: ModuleApi) -> KeyFallback:
    """In every process: Synapse's key requests to unreachable servers go to their
    relays (the send role's relays of each destination, `directory`)."""
    fallback = KeyFallback(directory, api)
    intercept_key_requests(api, fallback.answer)
    query_destinations_with_relays(fallback.has_relays)
    return fallback


def start_key_mailbox(
    config: RelayConfig,
    store: RelayStore,
    api: ModuleApi,
    holds_mail_for: Callable[[str], Awaitable[bool]],
) -> KeyMailbox | None:
    """`holds_mail_for` is the relay role's (`Relay.holds_mail_for`): the mailbox
    keeps keys of the servers whose mail the relay holds."""
    if not config.enabled:
        return None
    mailbox = KeyMailbox(config, store, api, holds_mail_for)
    mount_federation_endpoints(mailbox.endpoints())  # type: ignore[arg-type]
    return mailbox
