"""Collecting from relays and feeding Synapse: what the receive role (collector.py)
needs from Synapse's federation client, keyring and federation server.
"""

import json
from collections.abc import Collection, Iterable
from typing import Any

from signedjson.key import encode_verify_key_base64
from synapse.api.errors import (
    FederationDeniedError,
    HttpResponseException,
    RequestSendFailed,
)

# crypto/keyring.py: verifies and stores a server keys object (see store_notary_keys).
from synapse.crypto.keyring import BaseV2KeyFetcher

# http/matrixfederationclient.py: the pieces of a signed federation request (see
# InboundFederation.get_with_body).
from synapse.http.matrixfederationclient import (
    JsonParser,
    MatrixFederationRequest,
    _handle_response,
)
from synapse.module_api import JsonDict, ModuleApi

from synapse_relay._synapse import HeldKey, verify_signed_by


class RelayRequestFailed(Exception):
    """A request to a relay got no usable answer.

    `code` is the HTTP status when the relay answered with an error, None when it
    could not be reached (connection refused, timeout, TLS, DNS, ...).
    """

    def __init__(
        self,
        relay: str,
        reason: str,
        code: int | None = None,
        errcode: str | None = None,
    ) -> None:
        super().__init__(f"{relay}: {reason}")
        self.relay = relay
        self.reason = reason
        self.code = code
        # the Matrix errcode of an error answer, when it carried one
        self.errcode = errcode


class NotaryKeyRejected(Exception):
    """Keys offered by a relay's key-notary endpoint failed verification."""


class InboundFederation:
    """What the receive role needs from Synapse, none of which the module API offers.

    Everything is looked up lazily, at the first collection: modules are built
    while Synapse is still starting.
    """

    def __init__(self, api: ModuleApi) -> None:
        self._api = api
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

    async def post_json(
        self, destination: str, path: str, content: JsonDict, timeout_ms: int
    ) -> Any:
        """A signed federation POST (X-Matrix covers `content`); the JSON answer.

        Raises RelayRequestFailed. synapse/http/matrixfederationclient.py:
        `post_json` as Synapse's own federation requests use it; `timeout` and
        `ignore_backoff` as in `get_with_body`.
        """
        client = self._hs.get_federation_http_client()
        try:
            return await client.post_json(
                destination,
                path,
                data=content,
                timeout=timeout_ms,
                ignore_backoff=True,
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

    async def verify_signed(
        self, server_name: str, signed: JsonDict, valid_at_ms: int
    ) -> None:
        """Raise unless `signed` carries a valid signature of `server_name` with a
        key valid at `valid_at_ms` (see `verify_signed_by`)."""
        await verify_signed_by(self._api, server_name, signed, valid_at_ms)

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

    async def process_staged(self) -> None:
        """Make Synapse process the PDUs waiting in its inbound staging area now,
        rather than at its next once-a-minute retry.

        federation/federation_server.py: `_handle_received_pdu` stages a PDU, then
        `_process_incoming_pdus_in_room_inner` processes the room's staged PDUs
        under the room's `federation_inbound_pdu` lock. When that fails (our
        database went down), the PDUs stay staged until `_handle_old_staged_events`
        (every minute) takes them up again; it does so for every room whose lock it
        can take, so calling it does no harm to a room being processed.
        storage/databases/main/lock.py: the failed processing's lock is dropped with
        it (`LockStore._live_lock_tokens` holds locks weakly) and its row, which the
        database may still hold, can be taken again at once by the same instance
        (`_try_acquire_lock`'s upsert).
        """
        # (a background process: it runs on its own, as Synapse starts it)
        self._hs.get_federation_server()._handle_old_staged_events()


def _errcode(body: str) -> str | None:
    try:
        errcode = json.loads(body).get("errcode")
    except (ValueError, AttributeError):
        return None
    return errcode if isinstance(errcode, str) else None


def _request_failed(destination: str, e: Exception) -> RelayRequestFailed:
    """A RelayRequestFailed for an exception of Synapse's federation client.

    api/errors.py: `HttpResponseException` for answers >= 300 other than 429 and
    5xx; `RequestSendFailed` (wrapping an `HttpResponseException` for 429 and 5xx)
    when the request failed; `FederationDeniedError` when `destination` is not in
    `federation_domain_whitelist`.
    """
    inner = e.inner_exception if isinstance(e, RequestSendFailed) else e
    if isinstance(inner, HttpResponseException):
        body = inner.response.decode("utf-8", errors="replace")
        return RelayRequestFailed(
            destination,
            f"answered {inner.code} {inner.msg}: {body[:200]}",
            inner.code,
            _errcode(body),
        )
    if isinstance(e, FederationDeniedError):
        return RelayRequestFailed(
            destination, "not allowed by federation_domain_whitelist"
        )
    return RelayRequestFailed(destination, str(e) or type(e).__name__)


# ---------------------------------------------------------------------------
