"""A fake federation server: a signing key served over HTTPS, and a client that
signs requests with it the way the Matrix spec (and Dendrite) does."""

import time
import urllib.parse
from pathlib import Path
from typing import Any, Protocol

import requests
from canonicaljson import encode_canonical_json
from signedjson.key import (
    encode_verify_key_base64,
    generate_signing_key,
    get_verify_key,
)
from signedjson.sign import sign_json
from unpaddedbase64 import decode_base64, encode_base64

from synapse_relay.loopback import HTTP_TIMEOUT
from tests.harness.tls_server import TlsJsonServer

KEY_ID = "ed25519:test"
KEY_PATH = "/_matrix/key/v2/server"
DAY_MS = 24 * 60 * 60 * 1000


class Destination(Protocol):
    """What requests need of a homeserver (e.g. tests.harness.homeserver's)."""

    @property
    def server_name(self) -> str: ...

    @property
    def base_url(self) -> str: ...


def quote(s: str) -> str:
    """URL-quote a path parameter (everything but unreserved characters)."""
    return urllib.parse.quote(s, safe="")


class FakeServer(TlsJsonServer):
    """A federation identity `localhost:<port>` with signing key `ed25519:test`,
    whose key server runs on that port, so real homeservers can verify requests
    that `request()` signs."""

    def __init__(self, cert: tuple[Path, Path]) -> None:
        super().__init__(cert)
        self.signing_key = generate_signing_key("test")
        self.received: list[tuple[str, str]] = []  # (method, path) served

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        self.received.append((method, path))
        path = urllib.parse.urlsplit(path).path
        if method == "GET" and (path == KEY_PATH or path.startswith(KEY_PATH + "/")):
            return 200, self.server_keys()
        return 404, {"errcode": "M_UNRECOGNIZED", "error": "fake server"}

    def server_keys(self) -> dict[str, Any]:
        """A signed `/_matrix/key/v2/server` response, valid for a day."""
        keys = {
            "server_name": self.server_name,
            "valid_until_ts": int(time.time() * 1000) + DAY_MS,
            "verify_keys": {
                KEY_ID: {
                    "key": encode_verify_key_base64(get_verify_key(self.signing_key))
                }
            },
            "old_verify_keys": {},
        }
        signed: dict[str, Any] = sign_json(keys, self.server_name, self.signing_key)
        return signed

    def authorization(
        self,
        method: str,
        destination: str,
        uri: str,
        content: Any = None,
        origin: str | None = None,
        bad_signature: bool = False,
    ) -> str:
        """The `X-Matrix` Authorization header for a request (content is signed
        when not None)."""
        origin = origin or self.server_name
        signed: dict[str, Any] = {
            "method": method,
            "uri": uri,
            "origin": origin,
            "destination": destination,
        }
        if content is not None:
            signed["content"] = content
        sig = sign_json(signed, origin, self.signing_key)["signatures"][origin][KEY_ID]
        if bad_signature:
            raw = bytearray(decode_base64(sig))
            raw[0] ^= 0xFF
            sig = encode_base64(bytes(raw))
        return (
            f'X-Matrix origin="{origin}",destination="{destination}",'
            f'key="{KEY_ID}",sig="{sig}"'
        )

    def request(
        self,
        method: str,
        destination: Destination | tuple[str, str],
        path: str,
        *,
        content: Any = None,
        sign_content: bool = True,
        raw_body: bytes | None = None,
        query: dict[str, Any] | None = None,
        auth: bool = True,
        bad_signature: bool = False,
        origin_override: str | None = None,
    ) -> requests.Response:
        """Send a federation request to `destination` (a homeserver or
        `(server_name, base_url)`). `path` is sent as given (quote parameters).

        The body is `raw_body`, else the canonical JSON of `content` (for GET
        too, as Dendrite does), else empty. `content` is covered by the
        signature unless `sign_content=False`. `auth=False` omits the header,
        `bad_signature=True` corrupts the signature, `origin_override` claims
        another origin (still signing with this server's key).
        """
        if isinstance(destination, tuple):
            destination_name, base_url = destination
        else:
            destination_name, base_url = destination.server_name, destination.base_url
        uri = path
        if query:
            uri += "?" + urllib.parse.urlencode(query, doseq=True)
        headers = {}
        if auth:
            headers["Authorization"] = self.authorization(
                method,
                destination_name,
                uri,
                content if sign_content else None,
                origin=origin_override,
                bad_signature=bad_signature,
            )
        body = raw_body
        if body is None and content is not None:
            body = encode_canonical_json(content)
        if body is not None:
            headers["Content-Type"] = "application/json"
        return requests.request(
            method,
            base_url + uri,
            data=body,
            headers=headers,
            verify=False,
            timeout=HTTP_TIMEOUT,
        )


class FakeServerFactory:
    """Creates started FakeServers sharing one certificate; `stop_all()` stops
    them."""

    def __init__(self, cert: tuple[Path, Path]) -> None:
        self.cert = cert
        self.servers: list[FakeServer] = []

    def create(self) -> FakeServer:
        server = FakeServer(self.cert).start()
        self.servers.append(server)
        return server

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()
        self.servers.clear()
