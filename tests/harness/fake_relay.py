"""A fake relay: an HTTPS server answering `relay_txn` with whatever transactions a
test gives it, for the receive role's defences against a lying relay.

It hands out its entries oldest first and deletes the one a request acknowledges,
like a relay, but checks nothing: it does not verify X-Matrix signatures, and the
transactions are what the test wrote (destined to anyone, from any origin).
"""

import json
import ssl
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

RELAY_TXN_PREFIX = "/_matrix/federation/v1/relay_txn/"


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    # Keep-alive, as Synapse's federation client expects of a server: with
    # HTTP/1.0 it may reuse a connection the server is closing.
    protocol_version = "HTTP/1.1"

    def _reply(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        relay = self.server.relay
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        path = urllib.parse.urlsplit(self.path).path
        if self.command == "GET" and path.startswith(RELAY_TXN_PREFIX):
            content = json.loads(raw) if raw else {}
            self._reply(200, relay.answer(content.get("entry_id", 0)))
        else:
            self._reply(404, {"errcode": "M_UNRECOGNIZED", "error": "fake relay"})

    do_GET = do_PUT = do_POST = _handle

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, relay: "FakeRelay") -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.relay = relay


class FakeRelay:
    """`localhost:<port>`, serving relay_txn from `add()`ed transactions.

    `acknowledged` lists the entry ids requests acknowledged (deleted), in order;
    `requests` counts relay_txn requests.
    """

    def __init__(self, cert: tuple[Path, Path]) -> None:
        self.cert = cert
        self.port = 0
        self.entries: dict[int, dict[str, Any]] = {}
        self.acknowledged: list[int] = []
        self.requests = 0
        self._next_id = 1
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def server_name(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeRelay not started: it has no port yet")
        return f"localhost:{self.port}"

    def __repr__(self) -> str:
        return f"<FakeRelay localhost:{self.port}>"

    def add(self, transaction: dict[str, Any]) -> int:
        """Queue a transaction to hand out; its entry id."""
        with self._lock:
            entry_id = self._next_id
            self._next_id += 1
            self.entries[entry_id] = transaction
            return entry_id

    def answer(self, acknowledged: int) -> dict[str, Any]:
        with self._lock:
            self.requests += 1
            if self.entries.pop(acknowledged, None) is not None:
                self.acknowledged.append(acknowledged)
            if not self.entries:
                return {"transaction": {}, "entry_id": 0, "entries_queued": False}
            entry_id = min(self.entries)
            return {
                "transaction": self.entries[entry_id],
                "entry_id": entry_id,
                "entries_queued": True,
            }

    def start(self) -> "FakeRelay":
        server = _Server(self)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*self.cert)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name=f"fake-relay-{self.port}", daemon=True
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

    def __enter__(self) -> "FakeRelay":
        return self if self._server is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
