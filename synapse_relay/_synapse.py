"""Every touch of Synapse internals that the module API has no way to do.

Checked against matrix-synapse 1.163. Each function names the Synapse code it relies
on, so that a Synapse upgrade is this one file's work (see SYNAPSE.md in the design
notes for how each fact was verified).
"""

import re
from collections.abc import (
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Sequence,
)
from contextlib import AbstractAsyncContextManager as AsyncContextManager
from contextlib import contextmanager
from typing import Any, ClassVar, Protocol
from urllib.parse import quote

import attr
from signedjson.key import encode_verify_key_base64
from synapse.api.errors import (
    Codes,
    FederationDeniedError,
    HttpResponseException,
    RequestSendFailed,
    SynapseError,
)

# crypto/keyring.py: verifies and stores a server keys object (see store_notary_keys).
from synapse.crypto.keyring import BaseV2KeyFetcher

# federation/sender/__init__.py and per_destination_queue.py: the two module
# namespaces whose retry-limiter functions the send role wraps (bypass_backoff_for).
from synapse.federation import sender as federation_sender
from synapse.federation.sender import per_destination_queue

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

# federation/units.py: the Transaction that TransactionManager builds and hands to
# TransportLayerClient.send_transaction.
from synapse.federation.units import Transaction

# http/matrixfederationclient.py: the pieces of a signed federation request (see
# InboundFederation.get_with_body).
from synapse.http.matrixfederationclient import (
    JsonParser,
    MatrixFederationRequest,
    _handle_response,
)
from synapse.http.server import HttpServer

# logging/context.py: Deferreds awaited through make_deferred_yieldable must be fired
# from the sentinel logcontext (see fire_in_sentinel_context).
from synapse.logging.context import PreserveLoggingContext
from synapse.module_api import (
    JsonDict,
    ModuleApi,
    SynapseRequest,
    parse_json_object_from_request,
)

# synapse/storage/engines: the engine class tells SQLite and PostgreSQL apart.
from synapse.storage.engines import PostgresEngine
from synapse.types import StrCollection

# util/retryutils.py: Synapse's per-destination backoff.
from synapse.util import retryutils

# util/async_helpers.py: a keyed lock that keeps logcontexts right.
from synapse.util.async_helpers import Linearizer
from synapse.util.retryutils import NotRetryingDestination

# synapse/util/stringutils.py: the server-name grammar Synapse itself enforces.
from synapse.util.stringutils import parse_and_validate_server_name
from twisted.internet import defer

SERVLET_GROUP = "synapse_relay"

Handler = Callable[..., Awaitable[tuple[int, JsonDict]]]


class FederationEndpoint(Protocol):
    """A federation endpoint of this module, in Synapse's servlet idiom.

    `PATH` is a regular expression below `/_matrix/federation/v1`; the endpoint has
    `on_GET` and/or `on_PUT(origin, content, query, **path_args)` returning
    `(code, body)` and raising `SynapseError` for Matrix errors.
    """

    PATH: str

    def unsigned_body_is_harmless(self, content: JsonDict) -> bool:
        """Whether a GET body the signature does not cover may be ignored safely."""


def is_valid_server_name(name: str) -> bool:
    try:
        parse_and_validate_server_name(name)
    except ValueError:
        return False
    return True


def keyed_lock(api: ModuleApi, name: str) -> Callable[[str], AsyncContextManager[None]]:
    """`async with lock(key):` runs one holder per key at a time in this process.

    Synapse's `Linearizer` (util/async_helpers.py), which the module API does not
    offer, built with the homeserver's clock.
    """
    # synapse/module_api/__init__.py: ModuleApi keeps the HomeServer as `_hs`.
    return Linearizer(name, api._hs.get_clock()).queue


def is_postgres(txn: Any) -> bool:
    """Whether a `run_db_interaction` transaction runs on PostgreSQL."""
    return isinstance(txn.database_engine, PostgresEngine)


def mount_federation_endpoints(endpoints: Sequence[FederationEndpoint]) -> None:
    """Serve `endpoints` on every federation listener built after this call.

    `ModuleApi.register_web_resource` cannot do it: the federation resource is a leaf
    that answers 400 M_UNRECOGNIZED for any path it does not know. So the endpoints
    become a new servlet group, with Synapse's own X-Matrix authenticator (including
    `federation_domain_whitelist`) and federation ratelimiter.
    """
    SERVLET_GROUPS[SERVLET_GROUP] = tuple(
        type(
            f"{type(endpoint).__name__}Servlet",
            (_EndpointServlet,),
            {"PATH": endpoint.PATH, "endpoint": endpoint},
        )
        for endpoint in endpoints
    )


class _EndpointServlet(BaseFederationServlet):
    """Adapts a FederationEndpoint to Synapse's federation resource.

    It replaces `BaseFederationServlet._wrap`, which parses a body only for PUT and
    POST, so that a GET with a JSON body signed as content (as Dendrite's relay
    client sends it) authenticates.
    """

    endpoint: ClassVar[FederationEndpoint]

    def register(self, server: HttpServer) -> None:
        pattern = re.compile("^" + self.PREFIX + self.PATH + "$")
        for method in ("GET", "PUT"):
            handler = getattr(self.endpoint, f"on_{method}", None)
            if handler is not None:
                server.register_paths(
                    method, (pattern,), self._serve(handler), type(self).__name__
                )

    def _serve(self, handler: Handler) -> Callable[..., Awaitable[Any]]:
        async def serve(
            request: SynapseRequest, **path_args: str
        ) -> tuple[int, JsonDict]:
            content = _read_json_body(request)
            origin, content = await self._authenticate(request, content)
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
        except UnicodeEncodeError as e:
            # Checking the signature encodes the body as canonical JSON, which
            # fails (a 500 in Synapse) for JSON escapes of lone surrogates.
            raise SynapseError(
                400, f"Invalid Unicode in the request body: {e.reason}", Codes.BAD_JSON
            ) from e
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


def _read_json_body(request: SynapseRequest) -> JsonDict | None:
    """The request's JSON object body, None if it has none; 400 if it is not one."""
    assert request.content is not None
    request.content.seek(0)
    if not request.content.read(1):
        return None
    request.content.seek(0)
    return parse_json_object_from_request(request)


# --- The receive role (collector.py): collecting our mail and feeding it to Synapse --


class RelayRequestFailed(Exception):
    """A request to a relay got no usable answer.

    `code` is the HTTP status when the relay answered with an error, None when it
    could not be reached (connection refused, timeout, TLS, DNS, ...).
    """

    def __init__(self, relay: str, reason: str, code: int | None = None) -> None:
        super().__init__(f"{relay}: {reason}")
        self.relay = relay
        self.reason = reason
        self.code = code


class NotaryKeyRejected(Exception):
    """Keys offered by a relay's key-notary endpoint failed verification."""


@attr.s(frozen=True, auto_attribs=True)
class HeldKey:
    """A server signing key we already hold (`server_keys_json`)."""

    # unpadded base64 of the public key
    key: str
    valid_until_ts: int


class InboundFederation:
    """What the receive role needs from Synapse, none of which the module API offers.

    Everything is looked up lazily, at the first collection: modules are built
    while Synapse is still starting.
    """

    def __init__(self, api: ModuleApi) -> None:
        # synapse/module_api/__init__.py: ModuleApi keeps the HomeServer as `_hs`.
        self._hs = api._hs
        self.server_name: str = api.server_name

    async def get_with_body(
        self, destination: str, path: str, content: JsonDict, timeout_ms: int
    ) -> Any:
        """A signed federation GET whose JSON body is covered by the X-Matrix
        signature, as Dendrite's relay client sends relay_txn; the JSON answer.

        Raises RelayRequestFailed.

        synapse/http/matrixfederationclient.py: `get_json` cannot send a body, but
        `MatrixFederationHttpClient._send_request` signs a `MatrixFederationRequest`'s
        `json` as the request's content and sends it as the body (a falsy `json` is
        sent unsigned and without body: callers always send a non-empty object).
        `_handle_response` reads and parses the answer as `get_json` does. Passing
        `timeout` disables `_send_request`'s retries; `ignore_backoff` makes the
        request even while Synapse backs off from `destination`, since the collector
        keeps its own schedule (a failure still updates that backoff, and a success
        resets it, for Synapse's other traffic to the same server).
        """
        assert content, "an empty body would be sent unsigned"
        client = self._hs.get_federation_http_client()
        clock = self._hs.get_clock()
        request = MatrixFederationRequest(
            method="GET", destination=destination, path=path, json=content
        )
        start_ms = clock.time_msec()
        try:
            response = await client._send_request(
                request, timeout=timeout_ms, ignore_backoff=True
            )
            return await _handle_response(
                clock,
                self._hs.get_reactor(),
                timeout_ms / 1000,
                request,
                response,
                start_ms,
                parser=JsonParser(),
            )
        except Exception as e:
            raise _request_failed(destination, e) from e

    async def query_notary(
        self, notary: str, server_name: str, timeout_ms: int
    ) -> list[JsonDict]:
        """Every key of `server_name` that `notary` holds, as its key-notary
        endpoint (`POST /_matrix/key/v2/query`) answers them.

        Asking for all keys (`{}`) makes a Synapse notary answer from its cache
        without trying to reach `server_name` itself (rest/key/v2/
        remote_key_resource.py: `query_keys`), which is what we want for an offline
        origin. Raises RelayRequestFailed.
        """
        try:
            answer = await self._hs.get_federation_http_client().post_json(
                destination=notary,
                path="/_matrix/key/v2/query",
                data={"server_keys": {server_name: {}}},
                timeout=timeout_ms,
                ignore_backoff=True,
            )
        except Exception as e:
            raise _request_failed(notary, e) from e
        server_keys = answer.get("server_keys") if isinstance(answer, dict) else None
        if not isinstance(server_keys, list):
            raise RelayRequestFailed(notary, "key query answer has no server_keys list")
        return [keys for keys in server_keys if isinstance(keys, dict)]

    async def held_keys(
        self, server_name: str, key_ids: Iterable[str]
    ) -> dict[str, HeldKey]:
        """The signing keys of `server_name` we hold, by key id.

        storage/databases/main/keys.py: `get_server_keys_json` is what Synapse's
        `StoreKeyFetcher` (crypto/keyring.py) verifies signatures with: of several
        copies of a key, the most recently added one.
        """
        # (a @cachedList method, which mypy cannot type without Synapse's plugin)
        get_server_keys_json: Any = self._hs.get_datastores().main.get_server_keys_json
        found = await get_server_keys_json(
            [(server_name, key_id) for key_id in key_ids]
        )
        return {
            key_id: HeldKey(
                key=encode_verify_key_base64(result.verify_key),
                valid_until_ts=result.valid_until_ts,
            )
            for (_, key_id), result in found.items()
            if result is not None
        }

    async def store_notary_keys(self, notary: str, keys: JsonDict) -> None:
        """Verify and store one server's keys as `notary` answered them.

        Raises NotaryKeyRejected unless the answer carries a valid signature of
        `notary` (crypto/keyring.py: `Keyring.verify_json_for_server`, which fetches
        the notary's own key as for any server) and a valid self-signature of the
        keys' server (`BaseV2KeyFetcher.process_v2_response`, which then stores them
        in `server_keys_json` with `from_server` = the notary, exactly as Synapse
        stores what a configured trusted key server answers).
        """
        keyring = self._hs.get_keyring()
        try:
            await keyring.verify_json_for_server(notary, keys, 0)
        except Exception as e:
            raise NotaryKeyRejected(f"not signed by the notary {notary}: {e}") from e
        # crypto/keyring.py: the Keyring always has a ServerKeyFetcher, a
        # BaseV2KeyFetcher, among its `_key_fetchers`.
        fetcher = next(
            f for f in keyring._key_fetchers if isinstance(f, BaseV2KeyFetcher)
        )
        try:
            await fetcher.process_v2_response(
                from_server=notary,
                response_json=keys,
                time_added_ms=self._hs.get_clock().time_msec(),
            )
        except Exception as e:
            raise NotaryKeyRejected(str(e)) from e

    async def previous_response(
        self, origin: str, txn_id: str
    ) -> tuple[int, JsonDict] | None:
        """What Synapse answered when it processed this transaction id, if it did.

        storage/databases/main/transactions.py: `get_received_txn_response`, the
        `received_transactions` table that `FederationServer` consults (through
        `TransactionActions.have_responded`) to deduplicate transactions for a day.
        """
        store = self._hs.get_datastores().main
        return await store.get_received_txn_response(txn_id, origin)

    async def feed(
        self, origin: str, txn_id: str, transaction: JsonDict
    ) -> tuple[int, JsonDict]:
        """Synapse's own processing of a `/send/{txn_id}` from `origin`.

        federation/federation_server.py: `FederationServer.on_incoming_transaction`,
        what the `/send` servlet calls after authenticating `origin`. It answers 429
        while another transaction of `origin` is being processed, deduplicates by
        (origin, transaction id), checks each PDU's signatures and puts it in the
        inbound staging area (processed in the background), handles the EDUs, and
        raises when an EDU handler or the database fails.
        """
        return await self._hs.get_federation_server().on_incoming_transaction(
            origin, txn_id, self.server_name, transaction
        )

    async def still_staged(self, origin: str, event_ids: Collection[str]) -> set[str]:
        """Those of `event_ids` received from `origin` still waiting to be processed.

        storage/databases/main/event_federation.py: inbound PDUs wait in
        `federation_inbound_events_staging` (keyed by origin and event id) until
        `FederationServer._process_incoming_pdus_in_room_inner` has handled them
        (accepted, rejected or failed), then the row is deleted.
        """
        if not event_ids:
            return set()
        store = self._hs.get_datastores().main
        rows = await store.db_pool.simple_select_many_batch(
            table="federation_inbound_events_staging",
            column="event_id",
            iterable=event_ids,
            keyvalues={"origin": origin},
            retcols=("event_id",),
            desc="synapse_relay_still_staged",
        )
        return {row[0] for row in rows}


def _request_failed(destination: str, e: Exception) -> RelayRequestFailed:
    """A RelayRequestFailed for an exception of Synapse's federation client.

    api/errors.py: `HttpResponseException` for answers >= 300 other than 429 and
    5xx; `RequestSendFailed` (wrapping an `HttpResponseException` for 429 and 5xx)
    when the request failed; `FederationDeniedError` when `destination` is not in
    `federation_domain_whitelist`.
    """
    inner = e.inner_exception if isinstance(e, RequestSendFailed) else e
    if isinstance(inner, HttpResponseException):
        body = inner.response.decode("utf-8", errors="replace")[:200]
        return RelayRequestFailed(
            destination, f"answered {inner.code} {inner.msg}: {body}", inner.code
        )
    if isinstance(e, FederationDeniedError):
        return RelayRequestFailed(
            destination, "not allowed by federation_domain_whitelist"
        )
    return RelayRequestFailed(destination, str(e) or type(e).__name__)


# ---------------------------------------------------------------------------
# Outbound federation, for the send role (sender.py)
#
# Synapse 1.163 sends a transaction through this chain:
#   PerDestinationQueue._transaction_transmission_loop  (per_destination_queue.py;
#       calls get_retry_limiter first, only to give up early during a backoff)
#   -> TransactionManager.send_new_transaction          (transaction_manager.py)
#   -> TransportLayerClient.send_transaction            (transport/client.py;
#       put_json(..., long_retries=True): about 9 minutes against a dead server)
#   -> MatrixFederationHttpClient._send_request         (http/matrixfederationclient.py;
#       the destination's retry limiter, retries unless `timeout` is given)
# ---------------------------------------------------------------------------


@attr.s(frozen=True, auto_attribs=True)
class OutgoingTransaction:
    """A transaction Synapse's federation sender sends, as the send role sees it."""

    destination: str
    transaction_id: str
    pdu_count: int
    edu_count: int
    # Synapse's `json_data_callback`: the body Synapse would PUT, built afresh on
    # each call (it carries each PDU's `unsigned.age` as of the call).
    body: Callable[[], JsonDict]


class DeliveryError(Exception):
    """An outbound federation request that did not succeed.

    `original` is the exception Synapse raised, for giving the failure back to
    Synapse unchanged; `code` is the HTTP status the server answered, if it did.
    """

    def __init__(self, original: Exception, code: int | None = None) -> None:
        super().__init__(str(original))
        self.original = original
        self.code = code


class Unreachable(DeliveryError):
    """No usable answer: refused, reset, DNS, timeout, or a 5xx or 429 answer.

    Synapse's `RequestSendFailed`.
    """


class Rejected(DeliveryError):
    """The server answered an error that is not 5xx or 429 (400, 401, 403, 404...).

    Synapse's `HttpResponseException`: the server is up and speaking.
    """


class BackedOff(DeliveryError):
    """Not attempted: Synapse is backing off from the server.

    Synapse's `NotRetryingDestination` (synapse/util/retryutils.py).
    """


class Denied(DeliveryError):
    """Not attempted: the server is not in `federation_domain_whitelist`.

    Synapse's `FederationDeniedError`.
    """


@contextmanager
def _classified_delivery() -> Iterator[None]:
    """Turn the exceptions of MatrixFederationHttpClient's put_json/get_json into
    DeliveryErrors (synapse/http/matrixfederationclient.py, `_send_request`: a 5xx
    or 429 answer is a RequestSendFailed wrapping an HttpResponseException)."""
    try:
        yield
    except RequestSendFailed as e:
        inner = e.inner_exception
        code = inner.code if isinstance(inner, HttpResponseException) else None
        raise Unreachable(e, code) from e
    except HttpResponseException as e:
        raise Rejected(e, e.code) from e
    except NotRetryingDestination as e:
        raise BackedOff(e) from e
    except FederationDeniedError as e:
        raise Denied(e) from e


def sends_federation(api: ModuleApi) -> bool:
    """Whether this process sends federation transactions.

    synapse/server.py: `HomeServer.should_send_federation()` is true on the main
    process when no federation_sender worker is configured, and on
    federation_sender workers; only there does `get_federation_sender()` build a
    FederationSender (and so a TransactionManager).
    """
    return bool(api._hs.should_send_federation())


class OutboundFederation:
    """Synapse's federation HTTP client, as the send role uses it.

    The module API has no federation client: `api._hs` is the HomeServer
    (synapse/module_api/__init__.py), whose `get_federation_http_client()` is the
    process's MatrixFederationHttpClient (synapse/server.py, cached), which signs
    requests with X-Matrix and applies Synapse's retry limiter.
    """

    def __init__(self, api: ModuleApi) -> None:
        self._hs = api._hs
        self._client = self._hs.get_federation_http_client()

    async def send_transaction(
        self, txn: OutgoingTransaction, *, timeout_ms: int, ignore_backoff: bool
    ) -> JsonDict:
        """PUT /send/{txnId} to the destination, once.

        As TransportLayerClient.send_transaction (synapse/federation/transport/
        client.py) does it, except for `timeout=` instead of `long_retries=True`:
        MatrixFederationHttpClient._send_request retries only when no timeout is
        given (`if retries_left and not timeout`). With `ignore_backoff=False` a
        failure feeds Synapse's backoff of the destination as Synapse's own send
        would (`backoff_on_all_error_codes=True`, as Synapse passes); with True it
        is tried despite a backoff and a failure does not lengthen it
        (retryutils.get_retry_limiter: `backoff_on_failure = not ignore_backoff`).
        """
        path = "/_matrix/federation/v1/send/" + quote(txn.transaction_id, safe="")
        with _classified_delivery():
            return await self._client.put_json(
                txn.destination,
                path=path,
                json_data_callback=txn.body,
                timeout=timeout_ms,
                ignore_backoff=ignore_backoff,
                try_trailing_slash_on_400=True,
                backoff_on_all_error_codes=True,
            )

    async def deposit(
        self, relay: str, path: str, body: JsonDict, *, timeout_ms: int
    ) -> None:
        """PUT a deposit to a relay, once.

        `ignore_backoff=True`: Synapse's backoff of the relay (10 minutes after a
        5xx or a timeout, doubling to 7 days) neither stops deposits nor is fed by
        them; the send role keeps its own, much shorter, retry schedule per relay.
        A 200 still clears a backoff Synapse had for the relay (retryutils:
        RetryDestinationLimiter resets it on success).
        """
        with _classified_delivery():
            await self._client.put_json(
                relay, path=path, data=body, timeout=timeout_ms, ignore_backoff=True
            )

    async def probe(
        self, destination: str, *, timeout_ms: int, ignore_backoff: bool
    ) -> None:
        """GET /_matrix/federation/v1/version on a destination, once.

        `ignore_backoff` as for `send_transaction`. A success makes Synapse's retry
        limiter clear the destination's backoff and report it up
        (RetryDestinationLimiter.__exit__ -> Notifier.notify_remote_server_up), as
        after any request that succeeds.
        """
        with _classified_delivery():
            await self._client.get_json(
                destination,
                "/_matrix/federation/v1/version",
                timeout=timeout_ms,
                ignore_backoff=ignore_backoff,
            )

    def wake_destination(self, destination: str) -> None:
        """Make Synapse try the destination's queue now.

        synapse/federation/sender/__init__.py: FederationSender.wake_destination
        starts the destination's transmission loop (attempt_new_transaction), which
        sends whatever is queued or due for catch-up.
        """
        self._hs.get_federation_sender().wake_destination(destination)

    async def failure_for_synapse(self, destination: str, reason: str) -> Exception:
        """What to raise to Synapse for a transaction that nobody accepted and that
        was not tried directly (the destination was known to be down).

        NotRetryingDestination, with the destination's real retry timings, when
        Synapse is backing off from it: per_destination_queue.py then does what it
        does in that state (a backoff longer than an hour drops the queue into
        catch-up mode, which bounds memory). Otherwise RequestSendFailed: the
        events stay queued. Retry timings come from the main datastore
        (synapse/storage/databases/main/transactions.py).
        """
        store = self._hs.get_datastores().main
        # (a @cached method, which mypy cannot type without Synapse's plugin)
        get_retry_timings: Any = store.get_destination_retry_timings
        timings = await get_retry_timings(destination)
        now = self._hs.get_clock().time_msec()
        if timings and timings.retry_last_ts + timings.retry_interval > now:
            return NotRetryingDestination(
                retry_last_ts=timings.retry_last_ts,
                retry_interval=timings.retry_interval,
                destination=destination,
            )
        return RequestSendFailed(RuntimeError(reason), can_retry=True)


TransactionHandler = Callable[
    [OutgoingTransaction, Callable[[], Awaitable[JsonDict]]], Awaitable[JsonDict]
]


def intercept_outgoing_transactions(
    api: ModuleApi, handler: TransactionHandler
) -> None:
    """Route every transaction Synapse's federation sender sends through `handler`.

    synapse/server.py caches one TransportLayerClient per homeserver
    (`get_federation_transport_client`, @cache_in_self) and
    synapse/federation/sender/transaction_manager.py calls
    `self._transport_layer.send_transaction(transaction, json_data_cb)` through
    that attribute, so replacing the method on the instance sees every outgoing
    transaction. `handler` gets the transaction and a function that sends it the
    way Synapse would have (the original method, long retries included). What it
    returns is taken as the destination's /send answer: a `{"pdus": {}}` makes
    TransactionManager and PerDestinationQueue record the transaction as sent
    (its PDUs leave the queue and `last_successful_stream_ordering` advances, so
    nothing is left for catch-up).
    """
    client = api._hs.get_federation_transport_client()
    original = client.send_transaction

    async def send_transaction(
        transaction: Transaction,
        json_data_callback: Callable[[], JsonDict] | None = None,
    ) -> JsonDict:
        outgoing = OutgoingTransaction(
            destination=transaction.destination,
            transaction_id=transaction.transaction_id,
            pdu_count=len(transaction.pdus),
            edu_count=len(transaction.edus),
            body=json_data_callback or transaction.get_dict,
        )
        return await handler(
            outgoing, lambda: original(transaction, json_data_callback)
        )

    client.send_transaction = send_transaction  # type: ignore[method-assign]


# The send role's answer to "may Synapse send to this destination although it is
# backing off from it?" (see bypass_backoff_for).
_backoff_bypasses: list[Callable[[str], Awaitable[bool]]] = []


def bypass_backoff_for(lets_through: Callable[[str], Awaitable[bool]]) -> None:
    """Let the federation sender queue and send to destinations that
    `lets_through(destination)` accepts although Synapse is backing off from them.
    Everything else keeps Synapse's backoff. Two places, each replaced in that one
    module's namespace only:

    - synapse/federation/sender/per_destination_queue.py imports
      `get_retry_limiter` and calls it at the start of
      `_transaction_transmission_loop` only to raise NotRetryingDestination (it
      throws the limiter away); a backoff longer than an hour also drops the queue
      into catch-up mode there. The HTTP client calls
      `synapse.util.retryutils.get_retry_limiter` itself, so every request keeps
      Synapse's backoff.
    - synapse/federation/sender/__init__.py imports
      `filter_destinations_by_retry_limiter` and uses it to skip destinations
      whose backoff ends more than an hour away (CATCHUP_RETRY_INTERVAL) when it
      queues PDUs, receipts, presence and to-device messages.
    """
    _backoff_bypasses.append(lets_through)
    # Both names are imported (not defined) there, hence "attr-defined".
    per_destination_queue.get_retry_limiter = _get_retry_limiter  # type: ignore[attr-defined]
    federation_sender.filter_destinations_by_retry_limiter = (  # type: ignore[attr-defined]
        _filter_destinations_by_retry_limiter
    )


async def _lets_through(destination: str) -> bool:
    for lets_through in _backoff_bypasses:
        if await lets_through(destination):
            return True
    return False


async def _get_retry_limiter(*, destination: str, **kwargs: Any) -> Any:
    try:
        return await retryutils.get_retry_limiter(destination=destination, **kwargs)
    except NotRetryingDestination:
        if not await _lets_through(destination):
            raise
        kwargs["ignore_backoff"] = True
        return await retryutils.get_retry_limiter(destination=destination, **kwargs)


async def _filter_destinations_by_retry_limiter(
    destinations: StrCollection,
    clock: Any,
    store: Any,
    retry_due_within_ms: int = 0,
) -> StrCollection:
    kept = await retryutils.filter_destinations_by_retry_limiter(
        destinations, clock, store, retry_due_within_ms
    )
    if len(kept) == len(destinations):
        return kept
    kept_set = set(kept)
    let_through = [
        d for d in destinations if d not in kept_set and await _lets_through(d)
    ]
    return [*kept, *let_through] if let_through else kept


def on_remote_server_up(api: ModuleApi, callback: Callable[[str], None]) -> None:
    """Call `callback(server_name)` (which must not raise) whenever this process
    learns that a server is up again, before Synapse acts on it.

    synapse/notifier.py: `Notifier.notify_remote_server_up(server)` is called when
    a signed request from the server arrived on this process
    (Authenticator.reset_retry_timings, synapse/federation/transport/server/
    _base.py, when Synapse was backing off from it), when a request to it
    succeeded after failures (RetryDestinationLimiter, synapse/util/
    retryutils.py), when an admin resets the connection (admin
    `.../reset_connection`), and, on a federation_sender worker, when another
    process reports it over replication (REMOTE_SERVER_UP, synapse/replication/
    tcp/handler.py). Every caller goes through the process's one Notifier
    (synapse/server.py, cached), so the method is replaced on that instance.
    """
    notifier = api._hs.get_notifier()
    original = notifier.notify_remote_server_up

    def notify_remote_server_up(server: str) -> None:
        callback(server)
        original(server)

    notifier.notify_remote_server_up = notify_remote_server_up  # type: ignore[method-assign]


def fire_in_sentinel_context(
    waiters: Sequence["defer.Deferred[Any]"], result: Any
) -> None:
    """Fire Deferreds that callers await through `make_deferred_yieldable`.

    synapse/logging/context.py: a Deferred must be fired from the sentinel
    logcontext (`PreserveLoggingContext`), otherwise the firing code's logcontext
    leaks into the waiters' code and back ("Expected logging context ... was lost").
    """
    with PreserveLoggingContext():
        for waiter in waiters:
            waiter.callback(result)
