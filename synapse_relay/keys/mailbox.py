"""The relay role's key mailbox: it checks and stores the snapshots and one-time
keys each server whose mail it holds uploads, and answers `/user/devices`,
`/user/keys/query` and `/user/keys/claim` for that server, each escrowed key at
most once, then the device's fallback key. Its endpoints, counters and claim rate
limit live here; the tables are the store's (`store_key_snapshots`, ...).
"""

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from canonicaljson import encode_canonical_json
from synapse.module_api import JsonDict, ModuleApi
from synapse.module_api.errors import Codes, SynapseError

from synapse_relay._synapse.keys import ServerSignatures
from synapse_relay._synapse.servlets import mount_federation_endpoints
from synapse_relay.config import MAX_ESCROWED_ONE_TIME_KEYS, RelayConfig
from synapse_relay.keys.snapshot import (
    CLAIMS_PER_MINUTE,
    MAX_FUTURE_MS,
    MAX_SNAPSHOTS_PER_UPLOAD,
    MAX_USERS_PER_QUERY,
    Snapshot,
    answer_query,
    check_one_time_key,
    fail,
    json_object,
    parse_claim,
    parse_snapshot,
    user_of,
)
from synapse_relay.protocol import KEY_SNAPSHOTS, KEYS_PREFIX
from synapse_relay.stats import RoleStats
from synapse_relay.store import (
    EscrowedKey,
    KeyQuota,
    KeySnapshot,
    QuotaExceeded,
    RelayStore,
)

logger = logging.getLogger(__name__)

MAILBOX_COUNTERS = {
    "snapshots_stored": "Key snapshots stored for their owner",
    "uploads_refused": "Key uploads refused (bad signature, input or quota)",
    "one_time_keys_escrowed": "One-time keys received into escrow",
    "one_time_keys_claimed": "Escrowed one-time keys handed out",
    "fallback_keys_claimed": "Fallback keys handed out (no one-time key left)",
    "claims_refused": "Key claims refused (unknown keys, too many, rate limit)",
}


class KeyMailbox:
    """The relay role's key mailbox: what its endpoints share."""

    def __init__(
        self,
        config: RelayConfig,
        store: RelayStore,
        api: ModuleApi,
        holds_mail_for: Callable[[str], Awaitable[bool]],
    ) -> None:
        self._store = store
        self._api = api
        self._holds_mail_for = holds_mail_for
        self._signatures = ServerSignatures(api)
        self._quota = KeyQuota(
            max_users=config.max_key_users_per_destination,
            max_stock_per_device=MAX_ESCROWED_ONE_TIME_KEYS,
        )
        self._claims: dict[str, list[int]] = {}
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
            raise fail(
                404, f"This relay holds no keys of {server_name}", Codes.NOT_FOUND
            )

    async def _owner(self, origin: str, server_name: str) -> None:
        await self._held(server_name)
        if origin != server_name:
            raise fail(
                403, f"Only {server_name} may manage its keys here", Codes.FORBIDDEN
            )

    async def upload(
        self, origin: str, content: JsonDict | None, server_name: str
    ) -> JsonDict:
        """Store the owner's snapshots and escrow its one-time keys: all or nothing."""
        try:
            await self._owner(origin, server_name)
            snapshots, keys = await self._parse_upload(server_name, content)
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
            raise fail(
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
        body = json_object(content, "The body")
        raw = body.get("snapshots")
        if not isinstance(raw, list) or len(raw) > MAX_SNAPSHOTS_PER_UPLOAD:
            raise fail(
                400, f"snapshots must be a list of at most {MAX_SNAPSHOTS_PER_UPLOAD}"
            )
        now = self._api.get_current_time_msec()
        parsed: dict[str, Snapshot] = {}
        for value in raw:
            snapshot = parse_snapshot(server_name, value)
            if snapshot.user_id in parsed:
                raise fail(400, f"Two snapshots of {snapshot.user_id}")
            if snapshot.ts > now + MAX_FUTURE_MS:
                raise fail(
                    400, f"The snapshot of {snapshot.user_id} is from the future"
                )
            parsed[snapshot.user_id] = snapshot
        for snapshot in parsed.values():
            try:
                await self._signatures.verify(server_name, snapshot.json, snapshot.ts)
            except SynapseError as e:
                raise fail(
                    400,
                    f"The snapshot of {snapshot.user_id} is not signed by"
                    f" {server_name}: {e.msg}",
                    Codes.INVALID_SIGNATURE,
                ) from e
        keys = []
        for user_id, devices in json_object(
            body.get("one_time_keys", {}), "one_time_keys"
        ).items():
            owner = parsed.get(user_id)
            if owner is None:
                raise fail(
                    400, f"One-time keys of {user_id} come without a snapshot of them"
                )
            for device_id, device_keys in json_object(devices, "one_time_keys").items():
                device_keys = json_object(device_keys, "one-time keys of a device")
                if len(device_keys) > MAX_ESCROWED_ONE_TIME_KEYS:
                    raise fail(
                        400, f"At most {MAX_ESCROWED_ONE_TIME_KEYS} keys per device"
                    )
                for key_id, key in device_keys.items():
                    key = check_one_time_key(
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
        user_of(server_name, user_id)
        snapshots = await self._snapshots(server_name, [user_id])
        if user_id not in snapshots:
            raise fail(404, f"No keys of {user_id} here", Codes.NOT_FOUND)
        snapshot = Snapshot(snapshots[user_id], user_id, 0, {})
        return {**snapshot.answer_devices(), KEY_SNAPSHOTS: snapshots}

    async def query(
        self, origin: str, content: JsonDict | None, server_name: str
    ) -> JsonDict:
        await self._held(server_name)
        wanted = json_object(
            json_object(content, "The body").get("device_keys"), "device_keys"
        )
        if len(wanted) > MAX_USERS_PER_QUERY:
            raise fail(400, f"At most {MAX_USERS_PER_QUERY} users per query")
        for user_id, device_ids in wanted.items():
            user_of(server_name, user_id)
            if not isinstance(device_ids, list) or not all(
                isinstance(d, str) for d in device_ids
            ):
                raise fail(400, f"Devices of {user_id} must be a list of device IDs")
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
                raise fail(
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
