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


class Mailbox:
    """One server's mail on a relay, as the relay role keeps it: entries handed out
    oldest first; an acknowledgement deletes exactly that entry.

    `requests` lists the entry id each request acknowledged (0: none);
    `acknowledged` the ones that were deleted, in order. `forget_acks` makes it a
    relay that never deletes anything.
    """

    def __init__(self, *transactions: dict[str, Any]) -> None:
        self.entries: dict[int, dict[str, Any]] = {}
        self.requests: list[int] = []
        self.acknowledged: list[int] = []
        self.forget_acks = False
        self._next_id = 1
        self._lock = threading.Lock()
        for transaction in transactions:
            self.add(transaction)

    def add(self, transaction: dict[str, Any]) -> int:
        """Queue a transaction to hand out; its entry id."""
        with self._lock:
            entry_id = self._next_id
            self._next_id += 1
            self.entries[entry_id] = transaction
            return entry_id

    def answer(self, acknowledged: int) -> dict[str, Any]:
        """The relay_txn answer to a request acknowledging `acknowledged`."""
        with self._lock:
            self.requests.append(acknowledged)
            if not self.forget_acks and acknowledged in self.entries:
                del self.entries[acknowledged]
                self.acknowledged.append(acknowledged)
            if not self.entries:
                return {"transaction": {}, "entry_id": 0, "entries_queued": False}
            entry_id = min(self.entries)
            return {
                "transaction": self.entries[entry_id],
                "entry_id": entry_id,
                "entries_queued": True,
            }


class FakeRelay(TlsJsonServer, Mailbox):
    """`localhost:<port>`, a Mailbox served as relay_txn over HTTPS."""

    def __init__(self, cert: tuple[Path, Path]) -> None:
        TlsJsonServer.__init__(self, cert)
        Mailbox.__init__(self)

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        if method == "GET" and urllib.parse.urlsplit(path).path.startswith(
            RELAY_TXN_PREFIX
        ):
            content = json.loads(body) if body else {}
            return 200, self.answer(content.get("entry_id", 0))
        return 404, {"errcode": "M_UNRECOGNIZED", "error": "fake relay"}
