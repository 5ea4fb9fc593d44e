"""Figure 2: deposit throughput on a relay R, on SQLite and on PostgreSQL.

Signed deposits of realistic transactions (one ~1.5 KB PDU and three EDUs) from
four origins, `concurrency` requests in flight, against R's cheapest authenticated
federation request measured on the same R in the same run: a signed
`GET /_matrix/federation/v1/publicRooms`, which Synapse refuses (403,
`allow_public_rooms_over_federation` is off by default) right after checking the
X-Matrix signature and the federation rate limiter, touching no database. Three
more loads are reported for context: the same refusal for a signed `POST
publicRooms` carrying a deposit's body (Synapse parses it and its signature covers
it: what a 2 KB body costs before anything is stored), the owner collecting its
empty mailbox (signed GET, one indexed SELECT: the cost of a database round trip),
and deposits spread over many destinations.
"""

import itertools
import time
from typing import Any

from bench.common import (
    Closer,
    Context,
    LoadResult,
    Servers,
    SignedSession,
    Worker,
    json_size,
    realistic_transaction,
    run_load,
)
from bench.profiling import profiled
from synapse_relay.fake_federation import FakeServer
from synapse_relay.loopback import Homeserver, free_port
from synapse_relay.protocol import relay_txn_path, send_relay_path

ORIGINS = 4
# Destinations the context load `deposit_spread` spreads its deposits over.
SPREAD = 64
PUBLIC_ROOMS = "/_matrix/federation/v1/publicRooms"
# Deposits are distinct transactions: txn ids never repeat within a run.
_txn_numbers = itertools.count()


def relay_module_config() -> dict[str, Any]:
    """A relay that takes anything from anyone, with quotas out of the way."""
    return {
        "relay": {
            "enabled": True,
            "destinations": ["*"],
            "max_transactions_per_destination": 100_000_000,
            "max_bytes_per_destination": 1 << 50,
        }
    }


def start_relay(ctx: Context, servers: Servers, name: str, backend: str) -> Homeserver:
    relay = Homeserver(
        workdir=ctx.directory(name),
        port=free_port(),
        cert=ctx.cert,
        module_config=relay_module_config(),
        database=ctx.new_database(backend),
    )
    servers.homeservers.append(relay)
    relay.start()
    return relay


class Load:
    """The loads of figures 2 and 4 against one relay, from `ORIGINS` fake
    origins, each thread with its own connection."""

    def __init__(
        self, ctx: Context, relay: Homeserver, origins: list[FakeServer], mailbox: str
    ) -> None:
        self.ctx = ctx
        self.relay = relay
        self.origins = origins
        self.mailbox = mailbox
        self._bodies = [
            realistic_transaction("origin.invalid", mailbox, n, int(time.time() * 1000))
            for n in range(64)
        ]

    def body(
        self, number: int, origin: str, destination: str | None = None
    ) -> dict[str, Any]:
        """The deposit body number `number` (one of 64 pre-built ones)."""
        body = dict(self._bodies[number % len(self._bodies)])
        body["origin"] = origin
        body["destination"] = destination or self.mailbox
        return body

    def _session(self, thread: int) -> tuple[FakeServer, SignedSession]:
        origin = self.origins[thread % len(self.origins)]
        return origin, SignedSession(origin, self.relay)

    def deposit_worker(self, thread: int) -> tuple[Worker, Closer]:
        """Deposits for the one mailbox."""
        return self._depositor(thread, self.mailbox)

    def spread_deposit_worker(self, thread: int) -> tuple[Worker, Closer]:
        """Deposits for one of `SPREAD` destinations, a different one per thread."""
        return self._depositor(thread, f"spread{thread % SPREAD}.invalid")

    def _depositor(self, thread: int, destination: str) -> tuple[Worker, Closer]:
        origin, session = self._session(thread)

        def deposit(number: int) -> int:
            body = self.body(number, origin.server_name, destination)
            txn_id = f"bench-{next(_txn_numbers)}"
            path = send_relay_path(txn_id, destination)
            return session.request("PUT", path, body).status_code

        return deposit, session.close

    def public_rooms_worker(self, thread: int) -> tuple[Worker, Closer]:
        _, session = self._session(thread)

        def get(number: int) -> int:
            return session.request("GET", PUBLIC_ROOMS).status_code

        return get, session.close

    def public_rooms_body_worker(self, thread: int) -> tuple[Worker, Closer]:
        origin, session = self._session(thread)

        def post(number: int) -> int:
            body = self.body(number, origin.server_name)
            return session.request("POST", PUBLIC_ROOMS, body).status_code

        return post, session.close

    def empty_collect_worker(self, thread: int) -> tuple[Worker, Closer]:
        origin, session = self._session(thread)
        path = relay_txn_path(origin.server_name)

        def collect(number: int) -> int:
            return session.request("GET", path, {"entry_id": 0}).status_code

        return collect, session.close

    def run(self, kind: str, duration: float, profile: str | None = None) -> LoadResult:
        makers = {
            "deposit": (self.deposit_worker, 200),
            "deposit_spread": (self.spread_deposit_worker, 200),
            "public_rooms": (self.public_rooms_worker, 403),
            "public_rooms_body": (self.public_rooms_body_worker, 403),
            "empty_collect": (self.empty_collect_worker, 200),
        }
        make_worker, status = makers[kind]
        options = self.ctx.options
        with profiled(
            options.profile_dir if profile else None,
            self.relay.pid,
            profile or kind,
            self.ctx.log,
        ):
            return run_load(
                make_worker,
                concurrency=options.concurrency,
                duration=duration,
                expected_status=status,
                server_pid=self.relay.pid,
            )

    def warm_up(self) -> None:
        """Let R fetch every origin's key and fill its caches before measuring."""
        for thread in range(len(self.origins)):
            for make in (self.public_rooms_worker, self.deposit_worker):
                worker, close = make(thread)
                worker(0)
                close()
        for kind in ("public_rooms", "deposit"):
            self.run(kind, self.ctx.options.warmup / 2)


def measure(ctx: Context, backend: str) -> dict[str, Any]:
    servers = Servers()
    try:
        ctx.log(f"figure 2 ({backend}): starting R")
        relay = start_relay(ctx, servers, f"deposit-{backend}/R", backend)
        origins = [servers.fake(ctx.cert) for _ in range(ORIGINS)]
        mailbox = servers.fake(ctx.cert)
        load = Load(ctx, relay, origins, mailbox.server_name)
        load.warm_up()
        options = ctx.options
        results: dict[str, Any] = {
            "backend": backend,
            "concurrency": options.concurrency,
            "origins": ORIGINS,
            "transaction_bytes": json_size(load.body(0, origins[0].server_name)),
            "rounds": options.rounds,
        }
        kinds = (
            "public_rooms",
            "deposit",
            "public_rooms_body",
            "deposit_spread",
            "empty_collect",
        )
        parts: dict[str, list[LoadResult]] = {kind: [] for kind in kinds}
        each = options.duration / options.rounds
        for turn in range(options.rounds):
            for kind in kinds:
                ctx.log(
                    f"figure 2 ({backend}): {kind} for {each:.0f} s"
                    f" (round {turn + 1}/{options.rounds})"
                )
                part = load.run(kind, each, f"deposit-{backend}-{kind}-{turn + 1}")
                ctx.log(f"    {part.to_json()}")
                parts[kind].append(part)
        for kind in kinds:
            results[kind] = LoadResult.merge(parts[kind]).to_json()
        baseline = results["public_rooms"]["per_second"]
        for kind in kinds[1:]:
            results[kind]["ratio"] = (
                results[kind]["per_second"] / baseline if baseline else None
            )
        return results
    finally:
        servers.stop_all()


def run(ctx: Context) -> dict[str, Any]:
    return {backend: measure(ctx, backend) for backend in ctx.options.backends}
