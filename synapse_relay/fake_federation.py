"""Fake federation servers on loopback, for the tests and the benchmarks.

- `TlsJsonServer`: an HTTPS JSON server on a loopback port, in a thread; fake
  servers answer each request in `handle`.
- `FakeServer`: a federation identity `localhost:<port>` whose signing key is
  served over HTTPS, with a client that signs requests with it the way the Matrix
  spec (and Dendrite) does; `FakeServerFactory` starts and stops them.
"""

import json
import ssl
import threading
import time
import urllib.parse
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol, TypeVar

import requests
from canonicaljson import encode_canonical_json
from signedjson.key import (
    encode_verify_key_base64,
    generate_signing_key,
    get_verify_key,
)
from signedjson.sign import sign_json
from unpaddedbase64 import decode_base64, encode_base64

from synapse_relay.loopback import HTTP_TIMEOUT, Service
from synapse_relay.proof import signed_request

T = TypeVar("T", bound="TlsJsonServer")


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    # Keep-alive, as Synapse's federation client expects of a server: with
    # HTTP/1.0 it may reuse a connection the server is closing.
    protocol_version = "HTTP/1.1"

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        code, answer = self.server.owner.handle_request(
            self.command, self.path, self.headers, body
        )
        data = json.dumps(answer).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = _handle

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, owner: "TlsJsonServer") -> None:
        super().__init__(("127.0.0.1", owner.port), _Handler)
        self.owner = owner


class TlsJsonServer(Service):
    """`localhost:<port>` over TLS; subclasses answer each request in `handle`.

    It listens on a free port, or on `port` if it is set before `start()`.
    """

    def __init__(self, cert: tuple[Path, Path]) -> None:
        self.cert = cert
        self.port = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        """The (status, JSON answer) for a request; runs on a server thread."""
        raise NotImplementedError

    def handle_request(
        self, method: str, path: str, headers: Message, body: bytes
    ) -> tuple[int, Any]:
        """`handle`, for servers that also read the request's headers."""
        return self.handle(method, path, body)

    @property
    def server_name(self) -> str:
        if self._server is None:
            raise RuntimeError(f"{type(self).__name__} not started: it has no port yet")
        return f"localhost:{self.port}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} localhost:{self.port}>"

    @property
    def is_running(self) -> bool:
        return self._server is not None

    def start(self: T) -> T:
        server = _Server(self)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*self.cert)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},  # how fast stop() returns
            name=f"{type(self).__name__}-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        assert self._thread is not None
        self._thread.join()
        self._server = self._thread = None


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

    def origin_proof(self, transaction: dict[str, Any]) -> dict[str, str]:
        """The origin proof (DESIGN.md 2b) of `transaction`, a six-field T of
        which this server is the origin, as the send role makes it."""
        signed = sign_json(
            signed_request(transaction), self.server_name, self.signing_key
        )
        return {"key": KEY_ID, "sig": signed["signatures"][self.server_name][KEY_ID]}

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
