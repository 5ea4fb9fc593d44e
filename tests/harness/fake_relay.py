"""A fake relay: an HTTPS server answering `relay_txn` with whatever transactions a
test gives it, for the receive role's defences against a lying relay.

It hands out its entries oldest first and deletes the one a request acknowledges,
like a relay, but checks nothing: it does not verify X-Matrix signatures, and the
transactions are what the test wrote (destined to anyone, from any origin).
"""

import json
import threading
import urllib.parse
from pathlib import Path
from typing import Any

from tests.harness.tls_server import TlsJsonServer

RELAY_TXN_PREFIX = "/_matrix/federation/v1/relay_txn/"


class FakeRelay(TlsJsonServer):
    """`localhost:<port>`, serving relay_txn from `add()`ed transactions.

    `acknowledged` lists the entry ids requests acknowledged (deleted), in order;
    `requests` counts relay_txn requests.
    """

    def __init__(self, cert: tuple[Path, Path]) -> None:
        super().__init__(cert)
        self.entries: dict[int, dict[str, Any]] = {}
        self.acknowledged: list[int] = []
        self.requests = 0
        self._next_id = 1
        self._lock = threading.Lock()

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        if method == "GET" and urllib.parse.urlsplit(path).path.startswith(
            RELAY_TXN_PREFIX
        ):
            content = json.loads(body) if body else {}
            return 200, self.answer(content.get("entry_id", 0))
        return 404, {"errcode": "M_UNRECOGNIZED", "error": "fake relay"}

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
