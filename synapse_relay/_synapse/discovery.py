"""Relay discovery (discovery.py): Synapse's federation query API, on both sides,
the server's signing key and its keyring.

Checked against matrix-synapse 1.163 (SYNAPSE.md, "Federation query API for
discovery").
"""

from collections.abc import Awaitable, Callable
from typing import Any

from signedjson.sign import sign_json
from synapse.api.errors import (
    FederationDeniedError,
    HttpResponseException,
    RequestSendFailed,
    SynapseError,
)
from synapse.module_api import JsonDict, ModuleApi
from synapse.util.retryutils import NotRetryingDestination


class NoQueryHandler(Exception):
    """The server answered 404: it does not know the query type (no module)."""


class QueryFailed(Exception):
    """The query got no usable answer: unreachable, timeout, another error."""


class BadSignature(Exception):
    """The object is not signed by the server with a key valid now."""


def serve_query(
    api: ModuleApi, query_type: str, handler: Callable[[JsonDict], Awaitable[JsonDict]]
) -> None:
    """Answer the federation query `query_type` with `handler(args)`.

    synapse/federation/federation_server.py: FederationHandlerRegistry (one per
    process, `HomeServer.get_federation_registry`, cached) dispatches
    `GET /_matrix/federation/v1/query/{type}` (FederationQueryServlet,
    transport/server/federation.py, served by every process with a federation
    listener, generic workers included) to the handler registered for the type;
    `args` are the query parameters plus the authenticated `origin`. A type with
    no handler answers 404 M_NOT_FOUND.
    """
    api._hs.get_federation_registry().register_query_handler(query_type, handler)


def sign_as_this_server(api: ModuleApi, content: JsonDict) -> JsonDict:
    """`content` signed with this server's signing key (signed JSON, as Synapse
    signs its key responses: `HomeServer.signing_key`, synapse/server.py, the first
    key of `signing_key_path`)."""
    hs = api._hs
    signed: JsonDict = sign_json(content, hs.hostname, hs.signing_key)
    return signed


class DiscoveryFederation:
    """The federation client and keyring, as discovery uses them."""

    def __init__(self, api: ModuleApi) -> None:
        # synapse/module_api/__init__.py: ModuleApi keeps the HomeServer as `_hs`.
        self._hs = api._hs

    async def query(self, destination: str, query_type: str) -> Any:
        """The JSON answer of `destination` to the query, asked once.

        synapse/federation/federation_client.py `make_query` ->
        transport/client.py `make_query`: a signed GET with a 10 s timeout (so no
        retries). `ignore_backoff=True`: a query neither waits for nor feeds
        Synapse's backoff of the destination (retryutils.get_retry_limiter:
        `backoff_on_failure = not ignore_backoff`), so discovery never changes how
        Synapse delivers to it.
        """
        try:
            return await self._hs.get_federation_client().make_query(
                destination, query_type, {}, ignore_backoff=True
            )
        except HttpResponseException as e:
            if e.code == 404:
                raise NoQueryHandler(str(e)) from e
            raise QueryFailed(f"{e.code} {e.msg}") from e
        except (
            RequestSendFailed,
            NotRetryingDestination,
            FederationDeniedError,
        ) as e:
            raise QueryFailed(str(e)) from e

    async def verify_signed_by(
        self, server_name: str, signed: JsonDict, now_ms: int
    ) -> None:
        """Raise BadSignature unless `signed` carries a signature of `server_name`
        made with one of its keys valid at `now_ms`.

        synapse/crypto/keyring.py `Keyring.verify_json_for_server`: the key comes
        from Synapse's store of server keys, else is fetched (trusted key servers,
        then the server itself); no signature of that server, an unknown key or a
        wrong signature raise SynapseError.
        """
        try:
            await self._hs.get_keyring().verify_json_for_server(
                server_name, signed, now_ms
            )
        except SynapseError as e:
            raise BadSignature(e.msg) from e
