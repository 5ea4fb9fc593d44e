"""The admin API, `/_synapse/relay/v1/...`, for server admins only (DESIGN.md 4).

Each endpoint is a small class with a `PATH` (a regular expression below the
prefix) and `on_<METHOD>(request, **path_args)` returning `(code, body)`; the
resource authenticates the caller (401 without a valid access token, 403 for a
user who is not a server admin) before routing, so callers who are not admins
learn nothing about which paths exist.
"""

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
