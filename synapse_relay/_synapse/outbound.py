"""Outbound federation, for the send role (sender.py): Synapse's federation sender,
its federation client and its backoff; and for the relay's pusher (push.py): probes,
and replays of `PUT /send` requests that the origin signed (`replay_send`).

Synapse 1.163 sends a transaction through this chain:
  PerDestinationQueue._transaction_transmission_loop  (per_destination_queue.py;
      calls get_retry_limiter first, only to give up early during a backoff)
  -> TransactionManager.send_new_transaction          (transaction_manager.py)
  -> TransportLayerClient.send_transaction            (transport/client.py;
      put_json(..., long_retries=True): about 9 minutes against a dead server)
  -> MatrixFederationHttpClient._send_request         (http/matrixfederationclient.py;
      the destination's retry limiter, retries unless `timeout` is given)
"""

from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from io import BytesIO
from typing import Any, Protocol
from urllib.parse import quote, urlunparse

import attr
from signedjson.sign import sign_json
from synapse.api.errors import (
    FederationDeniedError,
    HttpResponseException,
    RequestSendFailed,
)

# federation/sender/__init__.py and per_destination_queue.py: the two module
# namespaces whose retry-limiter functions the send role wraps (bypass_backoff_for).
from synapse.federation import sender as federation_sender
from synapse.federation.sender import per_destination_queue

# federation/units.py: the Transaction that TransactionManager builds and hands to
# TransportLayerClient.send_transaction.
from synapse.federation.units import Transaction

# http/__init__.py and http/client.py: the body producer and the size-bounded body
# reader that MatrixFederationHttpClient uses for its own requests.
from synapse.http import QuieterFileBodyProducer
from synapse.http.client import read_body_with_max_size
from synapse.logging.context import make_deferred_yieldable, run_in_background
from synapse.module_api import JsonDict, ModuleApi
from synapse.types import StrCollection

# util/retryutils.py: Synapse's per-destination backoff.
from synapse.util import retryutils

# util/async_helpers.py: the logcontext-safe timeout Synapse puts on its requests.
from synapse.util.async_helpers import timeout_deferred
from synapse.util.retryutils import NotRetryingDestination
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

# The most of a /send answer that a replay reads (an answer lists at most 50 PDU
# results; Synapse reads JSON answers up to 10 MiB, http/matrixfederationclient.py).
MAX_SEND_ANSWER_BYTES = 1024 * 1024


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


@attr.s(frozen=True, auto_attribs=True)
class Answer:
    """What a server answered to a request: HTTP status and body."""

    code: int
    body: bytes


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

    def sign(self, request: JsonDict) -> tuple[str, str]:
        """(key id, signature) of our server signing key over `request`, as
        Synapse signs an X-Matrix request object.

        http/matrixfederationclient.py: `build_auth_headers` signs
        `{"method", "uri", "origin", "destination", "content"}` with
        `signedjson.sign.sign_json(..., hs.hostname, hs.signing_key)`
        (server.py: the first key of `signing_key_path`); Ed25519 is
        deterministic, so this is byte for byte the header Synapse would send.
        """
        key = self._hs.signing_key
        signed = sign_json(dict(request), self._hs.hostname, key)
        key_id = f"{key.alg}:{key.version}"
        return key_id, signed["signatures"][self._hs.hostname][key_id]

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

    async def replay_send(
        self,
        destination: str,
        path: str,
        body: bytes,
        authorization: str,
        *,
        timeout_ms: int,
    ) -> Answer:
        """PUT `body` to `path` (a `/send/{txnId}`) on `destination`, once, with
        an X-Matrix `authorization` header that another server (the transaction's
        origin) made.

        MatrixFederationHttpClient always signs a request itself
        (`_send_request` calls `build_auth_headers`), so this sends the request
        the way `_send_request` does but with the given header: through the
        client's `agent` (synapse/http/matrixfederationclient.py, `self.agent`:
        MatrixFederationAgent, or the outbound federation proxy of
        `outbound_federation_restricted_to`, wrapped in BlocklistingAgentWrapper),
        which does server discovery (.well-known, SRV), TLS and the IP blocklist
        on a `matrix-federation://` URI, with the same `timeout_deferred` and
        logcontext handling. Synapse's retry limiter is not consulted nor fed (the
        pusher keeps its own backoff), nor are its retries made.

        Returns whatever the destination answered, of any status. Raises
        Unreachable when there is no answer (connection, TLS, timeout), Denied
        when the destination is not in `federation_domain_whitelist`.
        """
        whitelist = self._hs.config.federation.federation_domain_whitelist
        if whitelist is not None and destination not in whitelist:
            raise Denied(FederationDeniedError(destination))
        uri = urlunparse(
            (
                b"matrix-federation",
                destination.encode("ascii"),
                path.encode("ascii"),
                None,
                b"",
                b"",
            )
        )
        headers = Headers(
            {
                b"Authorization": [authorization.encode("ascii")],
                b"Content-Type": [b"application/json"],
                b"User-Agent": [self._hs.version_string.encode("ascii")],
            }
        )
        clock = self._hs.get_clock()
        timeout_s = timeout_ms / 1000
        # IAgent.request and FileBodyProducer (QuieterFileBodyProducer's base) are
        # zope/Twisted declarations that mypy cannot check calls against.
        agent: Any = self._client.agent
        producer: Callable[[BytesIO], object] = QuieterFileBodyProducer
        try:
            response: IResponse = await make_deferred_yieldable(
                timeout_deferred(
                    deferred=run_in_background(
                        agent.request,
                        b"PUT",
                        uri,
                        headers=headers,
                        bodyProducer=producer(BytesIO(body)),
                    ),
                    timeout=timeout_s,
                    clock=clock,
                )
            )
            answer = BytesIO()
            await make_deferred_yieldable(
                timeout_deferred(
                    deferred=read_body_with_max_size(
                        response, answer, MAX_SEND_ANSWER_BYTES
                    ),
                    timeout=timeout_s,
                    clock=clock,
                )
            )
        except Exception as e:
            raise Unreachable(RequestSendFailed(e, can_retry=True)) from e
        return Answer(response.code, answer.getvalue())

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


class DestinationFilter(Protocol):
    """The signature of Synapse's `filter_destinations_by_retry_limiter`."""

    def __call__(
        self,
        destinations: StrCollection,
        clock: Any,
        store: Any,
        retry_due_within_ms: int = 0,
    ) -> Coroutine[Any, Any, StrCollection]: ...


def filter_letting_through(
    lets_through: Callable[[str], Awaitable[bool]],
) -> DestinationFilter:
    """Synapse's `filter_destinations_by_retry_limiter` (util/retryutils.py), which
    drops destinations Synapse backs off, except that it keeps those that
    `lets_through` accepts."""

    async def filter_destinations_by_retry_limiter(
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
            d for d in destinations if d not in kept_set and await lets_through(d)
        ]
        return [*kept, *let_through] if let_through else kept

    return filter_destinations_by_retry_limiter


_filter_destinations_by_retry_limiter = filter_letting_through(_lets_through)


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
