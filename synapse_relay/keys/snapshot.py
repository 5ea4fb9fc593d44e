"""The key mailbox's wire format: what a snapshot, a key claim and a key query
answer are, their checks, and the limits every side keeps. Pure: no I/O, no state.

A snapshot (signed JSON, signed by its server)::

    {"user_id": ..., "stream_id": ..., "devices": [{"device_id", "keys", ...}],
     "master_key": ..., "self_signing_key": ..., (both optional)
     "fallback_keys": {device_id: {"signed_curve25519:ID": {...}}},
     "ts": ms, "signatures": {server_name: {...}}}

Its first fields are the owner's own `/user/devices/{userId}` answer.
"""

from collections.abc import Iterable, Mapping, Sequence

import attr
from canonicaljson import encode_canonical_json
from signedjson.key import decode_verify_key_bytes
from signedjson.sign import SignatureVerifyException, verify_signed_json
from synapse.module_api import JsonDict
from synapse.module_api.errors import Codes, SynapseError
from unpaddedbase64 import decode_base64

from synapse_relay._synapse.keys import ALGORITHM
from synapse_relay.relay import destination_of

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


def fail(code: int, message: str, errcode: str = Codes.BAD_JSON) -> SynapseError:
    """The error refusing bad input (a 4xx, `errcode` M_BAD_JSON unless told)."""
    return SynapseError(code, message, errcode)


def json_object(value: object, what: str) -> JsonDict:
    """`value`, if it is a JSON object (`what` names it in the 400 if not)."""
    if not isinstance(value, dict):
        raise fail(400, f"{what} must be a JSON object")
    return value


def short_text(value: object, what: str) -> str:
    """`value`, if it is a string of 1 to 255 characters (a user or device ID)."""
    if not isinstance(value, str) or not value or len(value) > 255:
        raise fail(400, f"{what} must be a string of 1 to 255 characters")
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


def user_of(server_name: str, user_id: object) -> str:
    """`user_id`, if it is a user ID of `server_name`; 400 if not."""
    user_id = short_text(user_id, "A user ID")
    if destination_of(user_id) != server_name:
        raise fail(
            400, f"{user_id} is not a user of {server_name}", Codes.INVALID_PARAM
        )
    return user_id


CROSS_SIGNING_FIELDS = ("master_key", "self_signing_key")
# The fields of the owner's `/user/devices/{userId}` answer (a snapshot's first).
DEVICES_FIELDS = ("user_id", "stream_id", "devices") + CROSS_SIGNING_FIELDS


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
        return {
            field: self.json[field] for field in DEVICES_FIELDS if field in self.json
        }

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


def parse_snapshot(server_name: str, value: object) -> Snapshot:
    """Check a snapshot's content; 400 (403 for another server's user) if bad.

    Every device's keys must be signed by that device's own ed25519 key, and every
    fallback key by its device: a relay cannot make a device up without a snapshot
    signature, nor swap a key of a listed device without breaking the device's.
    """
    snapshot = json_object(value, "A snapshot")
    size = len(encode_canonical_json(snapshot))
    if size > MAX_SNAPSHOT_BYTES:
        raise fail(
            413,
            f"Snapshot of {size} bytes, at most {MAX_SNAPSHOT_BYTES}",
            Codes.TOO_LARGE,
        )
    user_id = short_text(snapshot.get("user_id"), "user_id")
    if destination_of(user_id) != server_name:
        raise fail(403, f"{user_id} is not a user of {server_name}", Codes.FORBIDDEN)
    ts = snapshot.get("ts")
    if not isinstance(ts, int) or isinstance(ts, bool) or ts < 0:
        raise fail(400, "ts must be an integer >= 0")
    if not isinstance(snapshot.get("stream_id"), int):
        raise fail(400, "stream_id must be an integer")
    devices = snapshot.get("devices")
    if not isinstance(devices, list) or len(devices) > MAX_DEVICES_PER_USER:
        raise fail(400, f"devices must be a list of at most {MAX_DEVICES_PER_USER}")
    device_keys: dict[str, str] = {}
    seen: set[str] = set()
    for device in devices:
        device = json_object(device, "A device")
        device_id = short_text(device.get("device_id"), "device_id")
        if device_id in seen:
            raise fail(400, f"Device {device_id} listed twice")
        seen.add(device_id)
        if "keys" in device:
            device_keys[device_id] = _check_device_keys(
                user_id, device_id, device["keys"]
            )
    for field in CROSS_SIGNING_FIELDS:
        if field in snapshot:
            key = json_object(snapshot[field], field)
            if key.get("user_id") != user_id:
                raise fail(400, f"{field} is not {user_id}'s")
    fallback_keys = json_object(snapshot.get("fallback_keys", {}), "fallback_keys")
    parsed = Snapshot(
        json={**snapshot, "fallback_keys": fallback_keys},
        user_id=user_id,
        ts=ts,
        device_keys=device_keys,
    )
    for device_id, keys in fallback_keys.items():
        for key_id, key in json_object(keys, "fallback keys of a device").items():
            check_one_time_key(parsed, device_id, key_id, key, "fallback key")
    return parsed


def _check_device_keys(user_id: str, device_id: str, value: object) -> str:
    keys = json_object(value, "Device keys")
    ed25519 = json_object(keys.get("keys"), "Device keys' keys").get(
        f"ed25519:{device_id}"
    )
    if (
        keys.get("user_id") != user_id
        or keys.get("device_id") != device_id
        or not isinstance(ed25519, str)
    ):
        raise fail(400, f"Keys of device {device_id} are not {user_id}'s")
    if not _device_signed(keys, user_id, device_id, ed25519):
        raise fail(
            400,
            f"Keys of {user_id}'s device {device_id} are not signed by that device",
            Codes.INVALID_SIGNATURE,
        )
    return ed25519


def check_one_time_key(
    snapshot: Snapshot, device_id: str, key_id: str, value: object, what: str
) -> JsonDict:
    key = json_object(value, what)
    if not key_id.startswith(f"{ALGORITHM}:") or len(key_id) > 255:
        raise fail(400, f"Only {ALGORITHM} keys are kept, not {key_id!r}")
    if not snapshot.signed_by_device(device_id, key):
        raise fail(
            400,
            f"The {what} {key_id} is not signed by {snapshot.user_id}'s device"
            f" {device_id} (or the device has no keys in the snapshot)",
            Codes.INVALID_SIGNATURE,
        )
    return key


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
    body = json_object(content, "The body")
    for user_id, devices in json_object(
        body.get("one_time_keys"), "one_time_keys"
    ).items():
        user_of(server_name, user_id)
        for device_id, algorithms in json_object(devices, "Devices claimed").items():
            short_text(device_id, "A device ID")
            if isinstance(algorithms, str):
                algorithms = [algorithms]
            if not isinstance(algorithms, list) or not all(
                isinstance(a, str) and a for a in algorithms
            ):
                raise fail(400, "Algorithms must be strings")
            for algorithm in dict.fromkeys(algorithms):
                wanted.append((user_id, device_id, algorithm))
    if len(wanted) > MAX_DEVICES_PER_CLAIM:
        raise fail(
            400,
            f"Too many keys claimed at once: {len(wanted)}, at most"
            f" {MAX_DEVICES_PER_CLAIM}",
        )
    return wanted
