"""An HTTPS client that sends a request exactly as given, over one kept-alive
connection: the path's bytes unchanged (odd percent-encodings, raw non-ASCII),
any body. For hostile-input tests, where `requests` would normalize the URL."""

import http.client
import ssl
from typing import Any


class _ExactConnection(http.client.HTTPSConnection):
    def _encode_request(self, request: str) -> bytes:
        # http.client refuses non-ASCII in the request line; send its bytes.
        return request.encode("utf-8", "surrogateescape")


class RawClient:
    """`request(method, path, body, headers)` to `host:port` over TLS, certificate
    checks off; reconnects when the server closed the connection."""

    def __init__(self, host: str, port: int, timeout: float = 60) -> None:
        self._host = host
        self._port = port
        self._timeout = timeout
        self._context = ssl.create_default_context()
        self._context.check_hostname = False
        self._context.verify_mode = ssl.CERT_NONE
        self._connection: _ExactConnection | None = None

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """(status, body) of the answer. Raises OSError or http.client errors if
        the server does not answer (twice: once on a stale kept-alive connection)."""
        for attempt in (1, 2):
            connection = self._connect()
            try:
                connection.putrequest(
                    method, path, skip_host=False, skip_accept_encoding=True
                )
                for name, value in (headers or {}).items():
                    connection.putheader(name, value)
                if body is not None:
                    connection.putheader("Content-Length", str(len(body)))
                connection.endheaders(body)
                response = connection.getresponse()
                data = response.read()
                if response.will_close:
                    self.close()
                return response.status, data
            except (
                http.client.RemoteDisconnected,
                ConnectionResetError,
                BrokenPipeError,
            ):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _connect(self) -> _ExactConnection:
        if self._connection is None:
            self._connection = _ExactConnection(
                self._host, self._port, timeout=self._timeout, context=self._context
            )
        return self._connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
