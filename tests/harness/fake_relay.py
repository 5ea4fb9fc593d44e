"""A fake relay: an HTTPS server answering `relay_txn` with whatever transactions a
test gives it, for the receive role's defences against a lying relay. Like
Dendrite's relay, it has no batch collect endpoint unless `batch` is set (it then
answers it as DESIGN.md section 2b says).

It hands out its entries oldest first and deletes the one a request acknowledges,
like a relay, but checks nothing: it does not verify X-Matrix signatures, and the
transactions are what the test wrote (destined to anyone, from any origin).
"""

import json
import threading
import urllib.parse
from pathlib import Path
from typing import Any

from synapse_relay.protocol import ORIGIN_AUTH
from tests.harness.tls_server import TlsJsonServer

RELAY_TXN_PREFIX = "/_matrix/federation/v1/relay_txn/"
COLLECT_PREFIX = "/_matrix/federation/unstable/synapse_relay/collect/"


class Mailbox:
    """One server's mail on a relay, as the relay role keeps it: entries handed out
    oldest first; an acknowledgement deletes exactly that entry.

    `requests` lists the entry id each relay_txn request acknowledged (0: none),
    `batch_requests` the (acknowledged ids, limit) of each batch collect request;
    `acknowledged` the ones that were deleted, in order. `forget_acks` makes it a
    relay that never deletes anything.
    """

    def __init__(self, *transactions: dict[str, Any]) -> None:
        self.entries: dict[int, dict[str, Any]] = {}
        # entry id -> the origin proof handed out beside it
        self.proofs: dict[int, Any] = {}
        self.requests: list[int] = []
        self.batch_requests: list[tuple[list[int], int]] = []
        self.acknowledged: list[int] = []
        self.forget_acks = False
        self._next_id = 1
        self._lock = threading.Lock()
        for transaction in transactions:
            self.add(transaction)

    def add(self, transaction: dict[str, Any], proof: Any = None) -> int:
        """Queue a transaction (with an origin proof, if given) to hand out; its
        entry id."""
        with self._lock:
            entry_id = self._next_id
            self._next_id += 1
            self.entries[entry_id] = transaction
            if proof is not None:
                self.proofs[entry_id] = proof
            return entry_id

    def answer(self, acknowledged: int) -> dict[str, Any]:
        """The relay_txn answer to a request acknowledging `acknowledged`."""
        with self._lock:
            self.requests.append(acknowledged)
            self._acknowledge(acknowledged)
            if not self.entries:
                return {"transaction": {}, "entry_id": 0, "entries_queued": False}
            entry_id = min(self.entries)
            answer = {
                "transaction": self.entries[entry_id],
                "entry_id": entry_id,
                "entries_queued": True,
            }
            if entry_id in self.proofs:
                answer[ORIGIN_AUTH] = self.proofs[entry_id]
            return answer

    def batch_answer(self, acknowledge: list[int], limit: int) -> dict[str, Any]:
        """The batch collect answer to a request acknowledging `acknowledge`."""
        with self._lock:
            self.batch_requests.append((list(acknowledge), limit))
            for entry_id in acknowledge:
                self._acknowledge(entry_id)
            ids = sorted(self.entries)
            return {
                "entries": [
                    {"entry_id": i, "transaction": self.entries[i]} for i in ids[:limit]
                ],
                "entries_queued": len(ids) > limit,
            }

    def _acknowledge(self, entry_id: int) -> None:
        if not self.forget_acks and entry_id in self.entries:
            del self.entries[entry_id]
            self.acknowledged.append(entry_id)


class FakeRelay(TlsJsonServer, Mailbox):
    """`localhost:<port>`, a Mailbox served as relay_txn over HTTPS."""

    def __init__(self, cert: tuple[Path, Path], batch: bool = False) -> None:
        TlsJsonServer.__init__(self, cert)
        Mailbox.__init__(self)
        self.batch = batch
        # every request's method and path, in order
        self.paths: list[str] = []

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        path = urllib.parse.urlsplit(path).path
        self.paths.append(f"{method} {path}")
        content = json.loads(body) if body else {}
        if method == "GET" and path.startswith(RELAY_TXN_PREFIX):
            return 200, self.answer(content.get("entry_id", 0))
        if self.batch and method == "POST" and path.startswith(COLLECT_PREFIX):
            return 200, self.batch_answer(
                content.get("acknowledge", []), content.get("limit", 10)
            )
        return 404, {"errcode": "M_UNRECOGNIZED", "error": "fake relay"}
