"""Figure 4: backlog scaling, deposit and collect rates on a relay holding a
million entries for other destinations, against an empty relay.

On each backend, two relays with the same configuration run side by side:
`empty`, and `full`, into whose tables `backlog` entries for
`backlog_destinations` other destinations were written while it was stopped
(`bench.seed`; then flushed to disk, as a backlog that grew over days would be).
The two are then measured in turns, `rounds` times, so that whatever else the
machine does weighs on both alike:

- deposits: the load of figure 2 (realistic transactions from four origins,
  `concurrency` in flight, for one mailbox), for `duration / rounds` seconds;
- collects: the mailbox's owner fetches `collect_entries / rounds` of them, one
  request at a time, acknowledging each in the next request as a collector does.

Also reported: how much the database grew per byte of transaction JSON queued.
"""

import os
import time
from typing import Any

from bench import deposit, seed
from bench.common import (
    BenchError,
    Context,
    LoadResult,
    Servers,
    collect_mailbox,
)
from bench.profiling import profiled
from synapse_relay.fake_federation import FakeServer

RELAYS = ("empty", "full")


def _collect(
    ctx: Context, load: deposit.Load, owner: FakeServer, count: int, name: str
) -> tuple[int, float, float]:
    with profiled(ctx.options.profile_dir, load.relay.pid, name, ctx.log):
        fetched, seconds, relay_cpu = collect_mailbox(owner, load.relay, count)
    if fetched < count:
        raise BenchError(f"{name}: collected {fetched} of {count} entries")
    return fetched, seconds, relay_cpu


def measure(ctx: Context, backend: str) -> dict[str, Any]:
    options = ctx.options
    servers = Servers()
    try:
        ctx.log(f"figure 4 ({backend}): starting two relays")
        relays = {
            name: deposit.start_relay(
                ctx, servers, f"backlog-{backend}/{name}", backend
            )
            for name in RELAYS
        }
        full = relays["full"]
        ctx.log(
            f"figure 4 ({backend}): seeding {options.backlog:,} entries for"
            f" {options.backlog_destinations} other destinations into `full`"
        )
        # Both restart together afterwards, so that they run the same code.
        for relay in relays.values():
            relay.stop()
        now_ms = int(time.time() * 1000)
        seeder = seed.seed_sqlite if backend == "sqlite" else seed.seed_postgres
        seeded = seeder(full, options.backlog, options.backlog_destinations, now_ms)
        ctx.log(f"    {seeded.to_json()}")
        started = time.monotonic()
        os.sync()
        ctx.log(f"    written to disk in {time.monotonic() - started:.0f} s")
        for relay in relays.values():
            relay.start()

        origins = [servers.fake(ctx.cert) for _ in range(deposit.ORIGINS)]
        owner = servers.fake(ctx.cert)
        loads = {
            name: deposit.Load(ctx, relay, origins, owner.server_name)
            for name, relay in relays.items()
        }
        for load in loads.values():
            load.warm_up()

        rounds = options.rounds
        deposits: dict[str, list[LoadResult]] = {name: [] for name in RELAYS}
        for turn in range(1, rounds + 1):
            for name in RELAYS:
                each = options.duration / rounds
                ctx.log(
                    f"figure 4 ({backend}): deposits on `{name}` for {each:.0f} s"
                    f" (round {turn}/{rounds})"
                )
                part = loads[name].run(
                    "deposit", each, f"backlog-{backend}-{name}-deposit-{turn}"
                )
                ctx.log(f"    {part.to_json()}")
                deposits[name].append(part)

        # relay -> [entries fetched, seconds, relay CPU seconds]
        collected: dict[str, list[float]] = {name: [0, 0.0, 0.0] for name in RELAYS}
        # No more than the deposits put in the mailbox (fewer on a loaded machine).
        deposited = min(
            sum(p.requests - sum(p.errors.values()) for p in deposits[n])
            for n in RELAYS
        )
        count = max(1, min(options.collect_entries, deposited) // rounds)
        for turn in range(1, rounds + 1):
            for name in RELAYS:
                ctx.log(
                    f"figure 4 ({backend}): collecting {count} entries from"
                    f" `{name}` (round {turn}/{rounds})"
                )
                fetched, seconds, cpu = _collect(
                    ctx,
                    loads[name],
                    owner,
                    count,
                    f"backlog-{backend}-{name}-collect-{turn}",
                )
                total = collected[name]
                total[0] += fetched
                total[1] += seconds
                total[2] += cpu

        results: dict[str, Any] = {"backend": backend, "backlog": seeded.to_json()}
        for name in RELAYS:
            entries, spent, cpu_spent = collected[name]
            results[name] = {
                "deposit": LoadResult.merge(deposits[name]).to_json(),
                "collect": {
                    "entries": int(entries),
                    "seconds": round(spent, 3),
                    "per_second": round(entries / spent, 1),
                    "server_cpu_ms_per_entry": round(
                        1000 * cpu_spent / max(entries, 1), 3
                    ),
                },
            }
        for kind in ("deposit", "collect"):
            results[f"{kind}_ratio"] = results["full"][kind]["per_second"] / max(
                results["empty"][kind]["per_second"], 1e-9
            )
        return results
    finally:
        servers.stop_all()


def run(ctx: Context) -> dict[str, Any]:
    return {backend: measure(ctx, backend) for backend in ctx.options.backends}
