"""The send role's side of the key mailbox (every process): `KeyFallback` answers
Synapse's own key requests (`/user/devices`, `/user/keys/query`,
`/user/keys/claim`) to an unreachable server from that server's relays, trusting
only what the server and its devices signed. Its counters live here.
"""

import logging
from collections.abc import Mapping
from urllib.parse import quote

from synapse.module_api import JsonDict, ModuleApi
from synapse.module_api.errors import SynapseError

from synapse_relay._synapse.keys import (
    KeyRelayClient,
    KeyRequest,
    RelayUnusable,
    ServerSignatures,
    intercept_key_requests,
    query_destinations_with_relays,
)
from synapse_relay.directory import RelayDirectory
from synapse_relay.keys.snapshot import (
    RELAY_TIMEOUT_MS,
    Snapshot,
    answer_query,
    fail,
    json_object,
    parse_snapshot,
)
from synapse_relay.protocol import KEY_SNAPSHOTS, keys_path
from synapse_relay.stats import RoleStats

logger = logging.getLogger(__name__)

USE_COUNTERS = {
    "requests_answered": "Key requests to an unreachable server answered by a relay",
    "keys_claimed": "One-time or fallback keys of an unreachable server claimed",
    "snapshots_refused": "Snapshots from a relay refused (bad signature or content)",
}


class KeyFallback:
    """Answers Synapse's key requests to an unreachable server from its relays.

    Nothing a relay says is taken on its word: every snapshot must carry its
    server's signature (with a key valid at the snapshot's time) and pass
    `parse_snapshot`, and every claimed key must be signed by its device as listed
    in such a snapshot. Answers are rebuilt from the checked snapshots.
    """

    def __init__(self, directory: RelayDirectory, api: ModuleApi) -> None:
        self._directory = directory
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
            wanted = json_object(request.body.get("device_keys"), "device_keys")
            return answer_query(wanted, {u: s.json for u, s in snapshots.items()})
        return {"one_time_keys": self._checked_keys(relay, raw, snapshots)}

    async def _checked(
        self, relay: str, destination: str, raw: JsonDict
    ) -> dict[str, Snapshot]:
        checked = {}
        for user_id, value in json_object(
            raw.get(KEY_SNAPSHOTS, {}), KEY_SNAPSHOTS
        ).items():
            try:
                snapshot = parse_snapshot(destination, value)
                if snapshot.user_id != user_id:
                    raise fail(400, f"snapshot of {snapshot.user_id} as {user_id}'s")
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
        for user_id, devices in json_object(
            raw.get("one_time_keys", {}), "keys"
        ).items():
            snapshot = snapshots.get(user_id)
            for device_id, keys in json_object(devices, "keys").items():
                for key_id, key in json_object(keys, "keys").items():
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
