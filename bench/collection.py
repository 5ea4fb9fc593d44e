"""Pure collect cost with batch collect (DESIGN.md section 2b), beside figure 3's
relay_txn one (`bench.common.collect_mailbox`): the owner fetches its mailbox from
the relay in batches, acknowledging each batch in the next request as the
collector does, without processing anything."""

import time

from bench.common import BenchError, SignedSession, cpu_seconds
from synapse_relay.loopback import Homeserver
from synapse_relay.protocol import COLLECT_MAX_LIMIT, collect_path
from synapse_relay.relay_client import BATCH_LIMIT


def collect_mailbox_batch(
    session: SignedSession,
    owner: str,
    relay: Homeserver,
    limit: int,
    batch: int = BATCH_LIMIT,
) -> tuple[int, float, float]:
    """The server `owner` fetches up to `limit` entries of its mailbox on `relay`
    over `session` (signed as `owner`, closed at the end), `batch` per request
    (the collector's batch size by default), acknowledging each batch in the next
    request and the last one in a final request. Returns (entries fetched,
    seconds, the relay's CPU seconds)."""
    assert 1 <= batch <= COLLECT_MAX_LIMIT
    path = collect_path(owner)
    fetched = 0
    acknowledge: list[int] = []
    relay_cpu = cpu_seconds(relay.pid)
    started = time.monotonic()
    try:
        while True:
            response = session.request(
                "POST", path, {"acknowledge": acknowledge, "limit": batch}
            )
            if response.status_code != 200:
                raise BenchError(f"batch collect answered {response.status_code}")
            entries = response.json()["entries"]
            fetched += len(entries)
            acknowledge = [entry["entry_id"] for entry in entries]
            if not entries or fetched >= limit:
                break
        if acknowledge:
            session.request("POST", path, {"acknowledge": acknowledge, "limit": 1})
    finally:
        session.close()
    return fetched, time.monotonic() - started, cpu_seconds(relay.pid) - relay_cpu
