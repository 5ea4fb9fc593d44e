"""An HTTPS JSON server on a free loopback port, in a thread, for fake servers."""

import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

from synapse_relay.loopback import Service

T = TypeVar("T", bound="TlsJsonServer")


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    # Keep-alive, as Synapse's federation client expects of a server: with
    # HTTP/1.0 it may reuse a connection the server is closing.
    protocol_version = "HTTP/1.1"

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        code, answer = self.server.owner.handle(self.command, self.path, body)
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
        super().__init__(("127.0.0.1", 0), _Handler)
        self.owner = owner


class TlsJsonServer(Service):
    """`localhost:<port>` over TLS; subclasses answer each request in `handle`."""

    def __init__(self, cert: tuple[Path, Path]) -> None:
        self.cert = cert
        self.port = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        """The (status, JSON answer) for a request; runs on a server thread."""
        raise NotImplementedError

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
