"""Serving the module's federation endpoints on Synapse's federation listeners.

The relay role's endpoints (relay.py) become a servlet group of Synapse's own
federation resource, with its X-Matrix authentication, whitelist and ratelimiter.
"""

import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar, Protocol

from synapse.api.errors import Codes, SynapseError

# synapse/federation/transport/server/__init__.py: SERVLET_GROUPS is read by every
# TransportLayerServer (the `federation` listener resource) when it is built, which
# happens after modules are loaded (synapse/app/_base.py).
from synapse.federation.transport.server import SERVLET_GROUPS

# synapse/federation/transport/server/_base.py: the servlet base class Synapse
# constructs with (hs, authenticator, ratelimiter, server_name), and the exception
# raised when a request carries no X-Matrix header at all.
from synapse.federation.transport.server._base import (
    BaseFederationServlet,
    NoAuthenticationError,
)
from synapse.http.server import HttpServer
from synapse.module_api import JsonDict, SynapseRequest

from synapse_relay._synapse import canonical_json_refusal, read_json_object

SERVLET_GROUP = "synapse_relay"

Handler = Callable[..., Awaitable[tuple[int, JsonDict]]]


class FederationEndpoint(Protocol):
    """A federation endpoint of this module, in Synapse's servlet idiom.

    `PATH` is a regular expression below `/_matrix/federation/v1` (or below the
    endpoint's `PREFIX`, if it has one); the endpoint has `on_GET`, `on_PUT` and/or
    `on_POST(origin, content, query, **path_args)` returning `(code, body)` and
    raising `SynapseError` for Matrix errors.
    """

    PATH: str

    def unsigned_body_is_harmless(self, content: JsonDict) -> bool:
        """Whether a GET body the signature does not cover may be ignored safely."""


def mount_federation_endpoints(endpoints: Sequence[FederationEndpoint]) -> None:
    """Serve `endpoints` (with those of earlier calls) on every federation
    listener built after this call.

    `ModuleApi.register_web_resource` cannot do it: the federation resource is a leaf
    that answers 400 M_UNRECOGNIZED for any path it does not know. So the endpoints
    become a new servlet group, with Synapse's own X-Matrix authenticator (including
    `federation_domain_whitelist`) and federation ratelimiter.
    """
    servlets = {
        (servlet.PREFIX, servlet.PATH): servlet
        for servlet in SERVLET_GROUPS.get(SERVLET_GROUP, ())
    }
    for endpoint in endpoints:
        prefix = getattr(endpoint, "PREFIX", BaseFederationServlet.PREFIX)
        servlets[prefix, endpoint.PATH] = type(
            f"{type(endpoint).__name__}Servlet",
            (_EndpointServlet,),
            {"PATH": endpoint.PATH, "PREFIX": prefix, "endpoint": endpoint},
        )
    # A later module instance in the same process (tests) replaces its paths.
    SERVLET_GROUPS[SERVLET_GROUP] = tuple(servlets.values())


class _EndpointServlet(BaseFederationServlet):
    """Adapts a FederationEndpoint to Synapse's federation resource.

    It replaces `BaseFederationServlet._wrap`, which parses a body only for PUT and
    POST, so that a GET with a JSON body signed as content (as Dendrite's relay
    client sends it) authenticates.
    """

    endpoint: ClassVar[FederationEndpoint]

    def register(self, server: HttpServer) -> None:
        pattern = re.compile("^" + self.PREFIX + self.PATH + "$")
        for method in ("GET", "PUT", "POST"):
            handler = getattr(self.endpoint, f"on_{method}", None)
            if handler is not None:
                server.register_paths(
                    method, (pattern,), self._serve(handler), type(self).__name__
                )

    def _serve(self, handler: Handler) -> Callable[..., Awaitable[Any]]:
        async def serve(
            request: SynapseRequest, **path_args: str
        ) -> tuple[int, JsonDict]:
            # Checking the X-Matrix signature encodes the body canonically.
            content = read_json_object(request, encoded_later=True)
            try:
                origin, content = await self._authenticate(request, content)
            except (ValueError, RecursionError) as e:
                # keyring.py, `process_json`: `verify_signed_json` lets the
                # encoding's error through (only bad signatures become 401s).
                raise canonical_json_refusal(e) from e
            with self.ratelimiter.ratelimit(origin) as wait:
                await wait
                return await handler(origin, content, request.args, **path_args)

        return serve

    async def _authenticate(
        self, request: SynapseRequest, content: JsonDict | None
    ) -> tuple[str, JsonDict | None]:
        """The X-Matrix origin, and the content the signature covers.

        A GET whose body is not covered by the signature is accepted only when the
        endpoint says ignoring that body is harmless (it cannot acknowledge, and so
        delete, anything); the body is then dropped.
        """
        try:
            origin = await self.authenticator.authenticate_request(request, content)
            return origin, content
        except NoAuthenticationError:
            raise
        except SynapseError as e:
            if e.code != 401 or content is None or request.method != b"GET":
                raise
        origin = await self.authenticator.authenticate_request(request, None)
        if not self.endpoint.unsigned_body_is_harmless(content):
            raise SynapseError(
                401,
                "The request body is not covered by the X-Matrix signature:"
                " sign it as the request's content",
                Codes.UNAUTHORIZED,
            )
        return origin, None
