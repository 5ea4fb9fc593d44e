"""Synapse's end-to-end keys, for the key mailbox (`synapse_relay.keys`).

Three directions, each touching different Synapse code:

- the key owner reads its users' keys and moves one-time keys out of its own pool
  (`LocalKeys`);
- every process answers Synapse's outgoing key requests to an unreachable server
  from that server's relays (`intercept_key_requests`);
- both sign and check owner signatures with the server's signing key and keyring
  (`ServerSignatures`), and talk to relays with Synapse's federation client
  (`KeyRelayClient`).
"""

import json
from collections.abc import Awaitable, Callable
from typing import Any

import attr

# signedjson: the signatures Synapse itself puts on federation JSON.
from signedjson.sign import sign_json
from synapse.api.errors import HttpResponseException, RequestSendFailed

# handlers/e2e_keys.py and handlers/device.py: the two module namespaces whose
# backoff filter the key mailbox widens (query_destinations_with_relays).
from synapse.handlers import device as device_handler
from synapse.handlers import e2e_keys as e2e_keys_handler
from synapse.module_api import JsonDict, ModuleApi
from synapse.types import UserID

# util/retryutils.py: raised instead of a request while Synapse backs off a server.
from synapse.util.retryutils import NotRetryingDestination

from synapse_relay._synapse.outbound import filter_letting_through

ALGORITHM = "signed_curve25519"


class LocalKeys:
    """This server's own users' keys, read from Synapse's database.

    synapse/handlers/device.py `DeviceHandler.on_federation_query_user_devices`
    builds what a remote server gets from `GET /user/devices/{userId}` (devices
    with their signed keys, cross-signing keys, `stream_id`); the tables below are
    synapse/storage/schema/main: `e2e_device_keys_json` (local devices' keys only,
    remote ones live in `device_lists_remote_cache`) and `e2e_fallback_keys_json`
    (delta 58/11fallback.sql, one fallback key per device and algorithm).
    """

    def __init__(self, api: ModuleApi) -> None:
        self._api = api
        self._hs = api._hs

    async def users_with_keys(self) -> list[str]:
        def txn(txn: Any) -> list[str]:
            txn.execute("SELECT DISTINCT user_id FROM e2e_device_keys_json")
            return sorted(row[0] for row in txn)

        return await self._api.run_db_interaction("synapse_relay_key_users", txn)

    async def user_devices(self, user_id: str) -> JsonDict:
        """The `/user/devices/{userId}` answer this server gives for a local user."""
        result: JsonDict = (
            await self._hs.get_device_handler().on_federation_query_user_devices(
                user_id
            )
        )
        return result

    async def fallback_keys(self, user_id: str) -> dict[str, dict[str, JsonDict]]:
        """device ID -> key ID ("signed_curve25519:AAAB") -> the signed key."""

        def txn(txn: Any) -> list[tuple[str, str, str, str]]:
            txn.execute(
                "SELECT device_id, algorithm, key_id, key_json"
                " FROM e2e_fallback_keys_json WHERE user_id = ?",
                (user_id,),
            )
            return list(txn)

        rows = await self._api.run_db_interaction("synapse_relay_fallback_keys", txn)
        result: dict[str, dict[str, JsonDict]] = {}
        for device_id, algorithm, key_id, key_json in rows:
            result.setdefault(device_id, {})[f"{algorithm}:{key_id}"] = _json_object(
                key_json
            )
        return result

    async def take_one_time_keys(
        self, wanted: list[tuple[str, str, int]]
    ) -> dict[str, dict[str, dict[str, JsonDict]]]:
        """Move up to `count` one-time keys of each (user, device) out of Synapse's
        pool: Synapse never hands them out itself afterwards, and its sync tells
        the device its pool shrank (`device_one_time_keys_count`), so the client
        uploads new ones.

        synapse/storage/databases/main/end_to_end_keys.py
        `EndToEndKeyWorkerStore.claim_e2e_one_time_keys` is what Synapse's own
        `/keys/claim` uses (oldest keys first; it invalidates the count cache).
        """
        store = self._hs.get_datastores().main
        claimed, _missing = await store.claim_e2e_one_time_keys(
            [
                (user_id, device_id, ALGORITHM, count)
                for user_id, device_id, count in wanted
            ]
        )
        return claimed


def _json_object(text: str) -> JsonDict:
    value = json.loads(text)
    assert isinstance(value, dict)
    return value


class ServerSignatures:
    """Owner signatures on key snapshots: this server's signing key and keyring.

    synapse/server.py: `HomeServer.signing_key` is the key Synapse signs
    federation traffic with (`config.key.signing_key[0]`), `hostname` its server
    name. synapse/crypto/keyring.py `Keyring.verify_json_for_server(server, obj,
    validity_time)` checks a signature with a key of `server` valid at
    `validity_time` (stored keys first, then notaries, then the server itself).
    """

    def __init__(self, api: ModuleApi) -> None:
        self._hs = api._hs

    def sign(self, obj: JsonDict) -> JsonDict:
        signed: JsonDict = sign_json(obj, self._hs.hostname, self._hs.signing_key)
        return signed

    async def verify(self, server_name: str, obj: JsonDict, at_ms: int) -> None:
        """Raise unless `obj` carries a valid signature of `server_name` made with
        a key valid at `at_ms` (never 0: that would accept any key ever seen)."""
        await self._hs.get_keyring().verify_json_for_server(
            server_name, obj, max(at_ms, 1)
        )


class RelayUnusable(Exception):
    """A relay gave no usable answer (unreachable, or an error answer)."""


class KeyRelayClient:
    """Requests to relays' key mailboxes, through Synapse's federation client
    (synapse/http/matrixfederationclient.py, X-Matrix signed).

    `ignore_backoff=True`: a relay Synapse backs off (after a failed deposit, say)
    is still asked; `timeout=` disables the client's own retries.
    """

    def __init__(self, api: ModuleApi) -> None:
        self._client = api._hs.get_federation_http_client()

    async def get(self, relay: str, path: str, timeout_ms: int) -> JsonDict:
        try:
            result: JsonDict = await self._client.get_json(
                relay, path, timeout=timeout_ms, ignore_backoff=True
            )
        except _FAILURES as e:
            raise RelayUnusable(str(e)) from e
        return result

    async def post(
        self, relay: str, path: str, body: JsonDict, timeout_ms: int
    ) -> JsonDict:
        try:
            result: JsonDict = await self._client.post_json(
                relay, path, data=body, timeout=timeout_ms, ignore_backoff=True
            )
        except _FAILURES as e:
            raise RelayUnusable(str(e)) from e
        return result


# What MatrixFederationHttpClient raises for a request that got no 2xx answer.
_FAILURES = (RequestSendFailed, HttpResponseException, NotRetryingDestination)


@attr.s(frozen=True, auto_attribs=True)
class KeyRequest:
    """One of Synapse's outgoing key requests, as the key mailbox sees it."""

    destination: str
    # "devices" (`/user/devices/{userId}`), "query" (`/user/keys/query`) or
    # "claim" (`/user/keys/claim`, stable shape: user -> device -> algorithm or,
    # from the unstable endpoint, a list of algorithms)
    kind: str
    user_id: str | None = None
    body: JsonDict = attr.Factory(dict)


# handler(request, failure): an answer in the shape the destination would have
# given, or None to let Synapse see `failure`.
KeyRequestHandler = Callable[[KeyRequest, Exception], Awaitable[JsonDict | None]]


def intercept_key_requests(api: ModuleApi, handler: KeyRequestHandler) -> None:
    """When Synapse's own request for keys to a server fails because the server is
    unreachable, let `handler` answer it (from the server's relays).

    synapse/federation/transport/client.py `TransportLayerClient` makes the
    requests: `query_user_devices` (device list resync, DeviceListUpdater in
    handlers/device.py, and key queries of untracked users, handlers/e2e_keys.py),
    `query_client_keys` (E2eKeysHandler.query_devices) and `claim_client_keys` /
    `claim_client_keys_unstable` (E2eKeysHandler.claim_one_time_keys, through
    FederationClient.claim_client_keys, which picks one of the two). synapse/
    server.py caches one TransportLayerClient per process
    (`get_federation_transport_client`) and FederationClient calls it through its
    `transport_layer` attribute, so replacing the methods on that instance covers
    every process that serves the client key endpoints (main and generic workers)
    and the device list updater. "Unreachable" is what the HTTP client raises for
    no answer: RequestSendFailed (refused, timeout, 5xx, 429) or
    NotRetryingDestination (backed off); any other answer is the server's own.
    """
    client = api._hs.get_federation_transport_client()
    original_query = client.query_client_keys
    original_devices = client.query_user_devices
    original_claim = client.claim_client_keys
    original_claim_unstable = client.claim_client_keys_unstable

    async def answer(
        request: KeyRequest, call: Callable[[], Awaitable[JsonDict]]
    ) -> JsonDict:
        try:
            return await call()
        except (RequestSendFailed, NotRetryingDestination) as e:
            result = await handler(request, e)
            if result is None:
                raise
            return result

    async def query_client_keys(
        destination: str, query_content: JsonDict, timeout: int
    ) -> JsonDict:
        return await answer(
            KeyRequest(destination, "query", body=query_content),
            lambda: original_query(destination, query_content, timeout),
        )

    async def query_user_devices(
        destination: str, user_id: str, timeout: int
    ) -> JsonDict:
        return await answer(
            KeyRequest(destination, "devices", user_id=user_id),
            lambda: original_devices(destination, user_id, timeout),
        )

    def claims_with(original: Callable[..., Awaitable[JsonDict]]) -> Any:
        """A wrapper of one of the two claim methods (same parameters)."""

        async def claim(
            user: UserID,
            destination: str,
            query_content: JsonDict,
            timeout: int | None,
        ) -> JsonDict:
            return await answer(
                KeyRequest(destination, "claim", body={"one_time_keys": query_content}),
                lambda: original(user, destination, query_content, timeout),
            )

        return claim

    client.query_client_keys = query_client_keys  # type: ignore[method-assign]
    client.query_user_devices = query_user_devices  # type: ignore[method-assign]
    client.claim_client_keys = claims_with(original_claim)  # type: ignore[method-assign]
    client.claim_client_keys_unstable = claims_with(original_claim_unstable)  # type: ignore[method-assign]


def query_destinations_with_relays(
    has_relays: Callable[[str], Awaitable[bool]],
) -> None:
    """Let Synapse ask for the keys of servers it backs off when they have relays
    (the requests then fail at once and `intercept_key_requests` answers them).

    Two places drop backed-off servers before any request, each replaced in that
    one module's namespace (both import `filter_destinations_by_retry_limiter`):
    handlers/e2e_keys.py `E2eKeysHandler.query_devices` (a client's /keys/query of
    users whose devices are not cached, answered "503 Not ready for retry"), and
    handlers/device.py `DeviceListUpdater._maybe_retry_device_resync` (the
    periodic retry of stale device lists, e.g. after a relayed
    m.device_list_update).
    """
    widened = filter_letting_through(has_relays)
    e2e_keys_handler.filter_destinations_by_retry_limiter = widened  # type: ignore[attr-defined]
    device_handler.filter_destinations_by_retry_limiter = widened  # type: ignore[attr-defined]
