"""The admin API, `/_synapse/relay/v1/...`, for server admins only (DESIGN.md 4).

Each endpoint is a small class with a `PATH` (a regular expression below the
prefix) and `on_<METHOD>(request, **path_args)` returning `(code, body)`; the
resource authenticates the caller (401 without a valid access token, 403 for a
user who is not a server admin) before routing, so callers who are not admins
learn nothing about which paths exist.
"""

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import unquote

from synapse.module_api import (
    DirectServeJsonResource,
    JsonDict,
    ModuleApi,
    SynapseRequest,
)
from synapse.module_api.errors import Codes, SynapseError

from synapse_relay._synapse import is_valid_server_name, read_json_object
from synapse_relay.collector import Collector
from synapse_relay.config import RelayConfig, SendConfig
from synapse_relay.directory import RelayDirectory, RelaysOfDestination
from synapse_relay.discovery import Discovery
from synapse_relay.protocol import MAX_RELAYS
from synapse_relay.sender import Sender
from synapse_relay.stats import RoleStats
from synapse_relay.store import RelayStore

PREFIX = "/_synapse/relay/v1"

METHODS = ("GET", "PUT", "POST", "DELETE")


class AdminEndpoint(Protocol):
    PATH: str


class QueuesEndpoint:
    """GET queues: what this relay holds, per destination."""

    PATH = "queues"

    def __init__(self, store: RelayStore) -> None:
        self._store = store

    async def on_GET(self, request: SynapseRequest) -> tuple[int, JsonDict]:
        queues = await self._store.queues()
        return 200, {
            "queues": [
                {
                    "destination": q.destination,
                    "transactions": q.transactions,
                    "bytes": q.bytes,
                    "oldest_ts": q.oldest_ts,
                    "proven": q.proven,
                }
                for q in queues
            ]
        }


class StatusEndpoint:
    """GET status: the counters of each role of this process."""

    PATH = "status"

    def __init__(self, roles: Mapping[str, RoleStats | None]) -> None:
        self._roles = roles

    async def on_GET(self, request: SynapseRequest) -> tuple[int, JsonDict]:
        return 200, {
            role: None if stats is None else stats.snapshot()
            for role, stats in self._roles.items()
        }


class CollectEndpoint:
    """POST collect: collect our mail from our relays now (the receive role).

    Joins the collection under way, if any, and answers when it is done with how
    many transactions were processed and rejected, in all and per relay.
    """

    PATH = "collect"

    def __init__(self, collector: Collector | None, collecting_instance: str) -> None:
        self._collector = collector
        # the instance that runs background tasks, which alone collects
        self._collecting_instance = collecting_instance

    async def on_POST(self, request: SynapseRequest) -> tuple[int, JsonDict]:
        if self._collector is None:
            raise SynapseError(
                400,
                "The receive role is not enabled: receive.relays is empty",
                Codes.UNKNOWN,
            )
        if not self._collector.runs_here:
            raise SynapseError(
                409,
                "Only the instance that runs background tasks collects: send this"
                f" request to {self._collecting_instance!r} (run_background_tasks_on)",
                Codes.UNKNOWN,
            )
        result = await self._collector.collect()
        return 200, result.to_json()


class RelaysEndpoint:
    """GET/PUT/DELETE relays/{destination}: the send role's relays of a destination.

    PUT stores them in the database, where they override `send.relays` and the
    discovered ones for that destination (an empty list: no relays); DELETE
    reverts to `send.relays` (or what was discovered); `DELETE
    ...?discovered=true` instead forgets the destination's advertisement (it is
    fetched again after the next transaction the destination accepts). Each
    answers the destination's relays as they now are (`describe`). A change
    counts at once on this process and within `directory.MAPPING_CACHE_MS` on the
    others.
    """

    PATH = "relays/(?P<destination>[^/]+)"

    def __init__(
        self,
        directory: RelayDirectory,
        discovery: Discovery,
        store: RelayStore,
        api: ModuleApi,
        sender: Sender | None,
    ) -> None:
        self._directory = directory
        self._discovery = discovery
        self._store = store
        self._server_name = api.server_name
        self._sender = sender

    async def on_GET(
        self, request: SynapseRequest, destination: str
    ) -> tuple[int, JsonDict]:
        check_destination(destination, self._server_name)
        return 200, describe(await self._directory.resolve(destination, fresh=True))

    async def on_PUT(
        self, request: SynapseRequest, destination: str
    ) -> tuple[int, JsonDict]:
        check_destination(destination, self._server_name)
        body = read_json_object(request)
        if body is None:
            raise SynapseError(400, "A JSON body is required", Codes.NOT_JSON)
        relays = parse_relays(body, destination, self._server_name)
        await self._store.set_send_relays(destination, relays)
        self._changed(destination)
        return 200, describe(await self._directory.resolve(destination, fresh=True))

    async def on_DELETE(
        self, request: SynapseRequest, destination: str
    ) -> tuple[int, JsonDict]:
        check_destination(destination, self._server_name)
        discovered = parse_boolean(request, "discovered", False)
        if discovered:
            await self._discovery.forget(destination)
        else:
            await self._store.delete_send_relays(destination)
        self._changed(destination)
        return 200, describe(await self._directory.resolve(destination, fresh=True))

    def _changed(self, destination: str) -> None:
        self._directory.invalidate()
        if self._sender is not None:
            self._sender.mapping_changed(destination)


class RelaysListEndpoint:
    """GET relays: every destination with relays from any source, or whose
    advertisement this server holds."""

    PATH = "relays"

    def __init__(self, directory: RelayDirectory) -> None:
        self._directory = directory

    async def on_GET(self, request: SynapseRequest) -> tuple[int, JsonDict]:
        found = await self._directory.everything()
        return 200, {"destinations": [describe(f) for f in found]}


class DiscoverEndpoint:
    """POST relays/{destination}/discover: fetch the destination's advertisement
    now (as discovery does after a transaction it accepted, once per
    `send.discover_interval`), and answer what came of it and the destination's
    relays as they now are."""

    PATH = "relays/(?P<destination>[^/]+)/discover"

    def __init__(
        self,
        config: SendConfig,
        directory: RelayDirectory,
        discovery: Discovery,
        api: ModuleApi,
    ) -> None:
        self._config = config
        self._directory = directory
        self._discovery = discovery
        self._server_name = api.server_name

    async def on_POST(
        self, request: SynapseRequest, destination: str
    ) -> tuple[int, JsonDict]:
        check_destination(destination, self._server_name)
        if not self._config.discover:
            raise SynapseError(
                400, "Discovery is off (send.discover is false)", Codes.UNKNOWN
            )
        outcome = await self._discovery.fetch(destination)
        found = await self._directory.resolve(destination, fresh=True)
        return 200, {"fetch": outcome.to_json(), **describe(found)}


class RegisteredEndpoint:
    """GET registered: the servers this relay holds mail for because they
    registered (`relay.serve_registered`), with when they last collected."""

    PATH = "registered"

    def __init__(self, config: RelayConfig, store: RelayStore, api: ModuleApi) -> None:
        self._config = config
        self._store = store
        self._api = api

    async def on_GET(self, request: SynapseRequest) -> tuple[int, JsonDict]:
        since = self._api.get_current_time_msec() - self._config.retention_ms
        registered = await self._store.registered(since)
        return 200, {
            "serve_registered": self._config.serve_registered,
            "registered": [
                {"server_name": name, "last_collect_ts": ts}
                for name, ts in registered.items()
            ],
        }


def describe(found: RelaysOfDestination) -> JsonDict:
    """A destination's relays as the admin API shows them."""
    held = found.discovered
    return {
        "destination": found.destination,
        "relays": list(found.relays),
        "source": found.source.value,
        "config_relays": list(found.config_relays),
        "discovered": None
        if held is None
        else {
            "relays": list(held.advertisement.relays),
            "ts": held.advertisement.ts,
            "valid_until_ts": held.advertisement.valid_until_ts,
            "fetched_ts": held.fetched_ts,
        },
    }


def check_destination(destination: str, own_server_name: str) -> None:
    if not is_valid_server_name(destination):
        raise SynapseError(
            400,
            f"Invalid destination {destination!r}: expected a server name such"
            " as example.org or example.org:8448",
            Codes.INVALID_PARAM,
        )
    if destination == own_server_name:
        raise SynapseError(
            400,
            f"{destination} is this server: it has no relays to send to",
            Codes.INVALID_PARAM,
        )


def parse_boolean(request: SynapseRequest, name: str, default: bool) -> bool:
    """`?name=true|false`; 400 for anything else."""
    values = request.args.get(name.encode("ascii"), [])
    if not values:
        return default
    value: bytes = values[-1]
    if value in (b"true", b"false"):
        return value == b"true"
    raise SynapseError(400, f"{name} must be true or false", Codes.INVALID_PARAM)


def parse_relays(
    content: JsonDict, destination: str, own_server_name: str
) -> tuple[str, ...]:
    """The relays of a PUT relays/{destination} body; 400 with a clear message."""
    relays = content.get("relays")
    if not isinstance(relays, list):
        raise SynapseError(
            400,
            'Expected {"relays": [...]}, a list of server names (an empty list for'
            " no relays)",
            Codes.BAD_JSON,
        )
    if len(relays) > MAX_RELAYS:
        raise SynapseError(
            400,
            f"Too many relays: {len(relays)}, at most {MAX_RELAYS}",
            Codes.INVALID_PARAM,
        )
    for index, relay in enumerate(relays):
        if not isinstance(relay, str) or not is_valid_server_name(relay):
            raise SynapseError(
                400,
                f"relays[{index}]: {json.dumps(relay)} is not a server name",
                Codes.INVALID_PARAM,
            )
        if relay == destination:
            raise SynapseError(
                400,
                f"relays[{index}]: {relay} is the destination itself",
                Codes.INVALID_PARAM,
            )
        if relay == own_server_name:
            raise SynapseError(
                400,
                f"relays[{index}]: {relay} is this server, which cannot hold mail"
                " for transactions it failed to send",
                Codes.INVALID_PARAM,
            )
        if relay in relays[:index]:
            raise SynapseError(
                400, f"relays[{index}]: {relay} is listed twice", Codes.INVALID_PARAM
            )
    return tuple(relays)


class AdminResource(DirectServeJsonResource):
    isLeaf = True

    def __init__(self, api: ModuleApi, endpoints: Sequence[AdminEndpoint]) -> None:
        super().__init__()
        self._api = api
        self._routes = [
            (re.compile(f"^{PREFIX}/{endpoint.PATH}$"), endpoint)
            for endpoint in endpoints
        ]

    async def _async_render_GET(self, request: SynapseRequest) -> tuple[int, Any]:
        return await self._dispatch(request)

    _async_render_PUT = _async_render_GET
    _async_render_POST = _async_render_GET
    _async_render_DELETE = _async_render_GET

    async def _dispatch(self, request: SynapseRequest) -> tuple[int, Any]:
        requester = await self._api.get_user_by_req(request)
        if not await self._api.is_user_admin(requester.user.to_string()):
            raise SynapseError(403, "You are not a server admin", Codes.FORBIDDEN)
        assert request.method is not None
        method = request.method.decode("ascii")
        path = request.path.decode("utf-8", errors="replace")
        for pattern, endpoint in self._routes:
            match = pattern.match(path)
            if match is None:
                continue
            handler = getattr(endpoint, f"on_{method}", None)
            if handler is None:
                raise SynapseError(
                    405, f"{method} is not supported on {path}", Codes.UNRECOGNIZED
                )
            path_args = {k: unquote(v) for k, v in match.groupdict().items()}
            return await handler(request, **path_args)  # type: ignore[no-any-return]
        raise SynapseError(404, f"Unknown path {path}", Codes.UNRECOGNIZED)
