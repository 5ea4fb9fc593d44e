"""Figure 1: fallback latency, the time from a message sent on A to its deposit
being visible on R while B is unreachable, against its direct delivery A -> B.

The demo's three homeservers (`synapse_relay.demo.Scenario`, SQLite): A falls back
to R for B. alice@A sends messages one at a time into a room bob@B joined; each is
timed from just before alice's client request until

- baseline: B is up, and the event is in B's database (`events`);
- (a) B refuses connections (B stopped): a deposit on R holding the message's
  text is in R's database (`synapse_relay_entries`);
- (b) B accepts TCP but never answers (a silent listener on B's port): the same.

A takes B for up after the baseline, and an admin's `reset_connection` on A
tells it so again before (b), so the first message of each case pays for A's
direct attempts and every later one shows the steady state. Both ends are
observed in the databases, read-only (SQLite in WAL mode: readers never block
Synapse), every 2 ms.
"""

import functools
import secrets
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from bench.common import (
    POLL_INTERVAL,
    AdminSession,
    BenchError,
    Context,
    sqlite_reader,
    summary,
    wait_for,
)
from synapse_relay.demo import Scenario, User
from synapse_relay.loopback import SilentListener
from synapse_relay.store import stored_txn_json

# How long one message may take to show up (the first message of case (b) took
# A's direct attempts' timeouts, 3 x 10 s, before deposits went on after 1 s).
MESSAGE_TIMEOUT = 180
WARMUP_MESSAGES = 3


class Messages:
    """alice's messages into the room, timed until a predicate sees them."""

    def __init__(self, scenario: Scenario, alice: User) -> None:
        self._scenario = scenario
        self._session = AdminSession(scenario.a, alice.token)
        self._path = (
            f"/_matrix/client/v3/rooms/{quote(scenario.room_id)}/send/m.room.message/"
        )
        self._tag = secrets.token_hex(4)

    def time(
        self, count: int, label: str, seen: Callable[[str, str], bool]
    ) -> list[float]:
        """Send `count` messages one after the other; the seconds each took until
        `seen(text, event_id)`."""
        latencies = []
        for number in range(count):
            text = f"fallback benchmark {self._tag} {label} {number}"
            started = time.monotonic()
            event_id = self._session.call(
                "PUT",
                self._path + secrets.token_hex(8),
                {"msgtype": "m.text", "body": text},
            )["event_id"]
            wait_for(
                functools.partial(seen, text, event_id),
                MESSAGE_TIMEOUT,
                f"{label} message {number}",
                interval=POLL_INTERVAL,
            )
            latencies.append(time.monotonic() - started)
        return latencies

    def close(self) -> None:
        self._session.close()


def _reset_b_on_a(scenario: Scenario, admin: AdminSession) -> None:
    """Make A take B for up again (as after B sent A a signed request), so the
    next message is first tried directly."""
    destination = quote(scenario.b.server_name, safe="")
    admin.call(
        "POST",
        f"/_synapse/admin/v1/federation/destinations/{destination}/reset_connection",
        {},
    )


def run(ctx: Context) -> dict[str, Any]:
    options = ctx.options
    count = options.fallback_messages
    scenario = Scenario(ctx.directory("fallback"))
    if options.attempts_before_relay is not None:
        assert scenario.a.module_config is not None
        scenario.a.module_config["send"]["attempts_before_relay"] = (
            options.attempts_before_relay
        )
    listener: SilentListener | None = None
    messages: Messages | None = None
    admin: AdminSession | None = None
    try:
        ctx.log("figure 1: starting A, R, B; bob@B joins alice@A's room")
        scenario.start_and_join()
        admin = AdminSession(scenario.a, User(scenario.a, "admin", admin=True).token)
        messages = Messages(scenario, scenario.alice)
        results: dict[str, Any] = {"messages": count}

        with sqlite_reader(scenario.b) as b_db, sqlite_reader(scenario.r) as r_db:

            def on_b(text: str, event_id: str) -> bool:
                row = b_db.execute(
                    "SELECT 1 FROM events WHERE event_id = ?", (event_id,)
                ).fetchone()
                return row is not None

            # R stores transactions compressed: read them as R does.
            r_db.create_function("txn_json", 2, stored_txn_json, deterministic=True)

            def on_r(text: str, event_id: str) -> bool:
                row = r_db.execute(
                    "SELECT 1 FROM synapse_relay_entries WHERE destination = ?"
                    " AND instr(txn_json(txn_json, txn_compressed), ?) > 0",
                    (scenario.b.server_name, text),
                ).fetchone()
                return row is not None

            messages.time(WARMUP_MESSAGES, "warm-up", on_b)
            ctx.log(f"figure 1: baseline, {count} messages A -> B, B up")
            baseline = messages.time(count, "direct", on_b)
            results["direct"] = summary(baseline)

            ctx.log(f"figure 1 (a): {count} messages while B refuses connections")
            scenario.b.stop()
            refused = messages.time(count, "refused", on_r)
            results["refused"] = summary(refused)

            ctx.log(f"figure 1 (b): {count} messages while B never answers")
            listener = SilentListener(scenario.b.port)
            listener.start()
            _reset_b_on_a(scenario, admin)
            silent = messages.time(count, "silent", on_r)
            results["silent"] = summary(silent)
            if listener.connections == 0:
                raise BenchError("A never connected to the silent listener")
            results["silent_connections"] = listener.connections
        results["latencies"] = {
            "direct": baseline,
            "refused": refused,
            "silent": silent,
        }
        return results
    finally:
        if messages is not None:
            messages.close()
        if admin is not None:
            admin.close()
        if listener is not None:
            listener.stop()
        scenario.stop_all()
