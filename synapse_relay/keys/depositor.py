"""The key owner's side (receive role): `KeyDepositor` keeps a signed snapshot of
each of our users' keys on each of our relays, and a stock of one-time keys per
device moved out of Synapse's own pool so that only the relay hands them out. Its
counters, and the escrow stock left on each relay, live here.
"""

import hashlib
import logging

from canonicaljson import encode_canonical_json
from prometheus_client import Gauge
from synapse.module_api import JsonDict, ModuleApi

from synapse_relay._synapse.keys import (
    ALGORITHM,
    KeyRelayClient,
    LocalKeys,
    RelayUnusable,
    ServerSignatures,
)
from synapse_relay.config import ReceiveConfig
from synapse_relay.keys.snapshot import (
    DEVICES_FIELDS,
    MAX_SNAPSHOTS_PER_UPLOAD,
    RELAY_TIMEOUT_MS,
)
from synapse_relay.protocol import keys_path
from synapse_relay.stats import RoleStats
from synapse_relay.store import Stock

logger = logging.getLogger(__name__)

DEPOSIT_COUNTERS = {
    "snapshots_uploaded": "Key snapshots of our users uploaded to a relay",
    "one_time_keys_escrowed": "One-time keys moved from our pool to a relay",
    "upload_failures": "Key uploads to a relay that failed",
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


def snapshot_content_digest(content: JsonDict) -> str:
    return hashlib.sha256(encode_canonical_json(content)).hexdigest()


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
                for field in DEVICES_FIELDS
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
