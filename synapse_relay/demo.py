"""`synapse-relay demo`: the seed's diagram between three real homeservers.

A (sender, alice), R (relay, holding mail for B) and B (recipient, bob) run on
loopback. bob joins alice's room while all are online; B goes offline and alice
sends messages, each deposited on R; A goes offline too and B comes back: bob
receives every message through R, in order.

With `--workers`, R is a Synapse worker deployment (loopback_workers.py) and the
demo says which of its processes did what.

`Scenario` is the scenario itself, step by step, shared with the end-to-end test;
`main` adds the command line and the output meant for people.
"""

import argparse
import json
import os
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

from synapse_relay.loopback import (
    Homeserver,
    PostgresCluster,
    PostgresError,
    SynapseProcess,
    free_port,
    make_self_signed_cert,
    terminated_as_interrupt,
    wait_until,
)
from synapse_relay.loopback_workers import (
    BACKGROUND_TASKS,
    FEDERATION_SENDER,
    RedisServer,
    Worker,
    WorkerHomeserver,
)
from synapse_relay.protocol import (
    FEDERATION_PREFIX,
    collect_path,
    relay_txn_path,
)

# How long one message may take to reach R, then B, before the demo gives up.
STEP_TIMEOUT = 60
# B polls R this often (its first collection is at start-up).
POLL_INTERVAL = "5s"
# With --workers: the federation reader whose listener is R's address (a reverse
# proxy would spread federation over both readers; the demo has none).
R_ADDRESS_WORKER = "federation1"


_TIMELINE_FILTER = json.dumps({"room": {"timeline": {"limit": 1000}}})


class StepFailed(Exception):
    """A step of the demo did not happen; the message says which and why."""


class User:
    """A user on one homeserver, speaking the client-server API."""

    def __init__(
        self, homeserver: Homeserver, localpart: str, admin: bool = False
    ) -> None:
        self.homeserver = homeserver
        self.password = secrets.token_urlsafe(9)
        self.user_id = homeserver.user_id(localpart)
        self.token = homeserver.register_user(localpart, admin, self.password)
        self._since = ""
        self._texts: dict[str, list[str]] = {}

    def call(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        response = self.homeserver.client(
            method,
            "/_matrix/client/v3" + path,
            token=self.token,
            json=body,
            params=params or None,
        )
        if not response.ok:
            raise StepFailed(
                f"{self.user_id}: {method} {path} answered {response.status_code}"
                f" {response.text[:200]}"
            )
        return response.json()

    def create_room(self, invite: str) -> str:
        room_id: str = self.call(
            "POST", "/createRoom", {"preset": "private_chat", "invite": [invite]}
        )["room_id"]
        return room_id

    def join(self, room_id: str) -> None:
        self.call("POST", f"/join/{quote(room_id)}", {})

    def send_text(self, room_id: str, text: str) -> str:
        txn_id = secrets.token_hex(8)
        event_id: str = self.call(
            "PUT",
            f"/rooms/{quote(room_id)}/send/m.room.message/{txn_id}",
            {"msgtype": "m.text", "body": text},
        )["event_id"]
        return event_id

    def members(self, room_id: str) -> set[str]:
        chunk = self.call("GET", f"/rooms/{quote(room_id)}/joined_members")
        return set(chunk["joined"])

    def texts(self, room_id: str) -> list[str]:
        """The room's text messages seen so far by syncing, oldest first.

        Read from /sync, incrementally as clients do, rather than /messages: that
        first tries to backfill from the room's other servers, and waits for the
        offline ones.
        """
        params: dict[str, Any] = {"timeout": 0, "filter": _TIMELINE_FILTER}
        if self._since:
            params["since"] = self._since
        sync = self.call("GET", "/sync", **params)
        self._since = sync["next_batch"]
        for joined_room_id, room in sync.get("rooms", {}).get("join", {}).items():
            self._texts.setdefault(joined_room_id, []).extend(
                e["content"].get("body", "")
                for e in room.get("timeline", {}).get("events", [])
                if e["type"] == "m.room.message"
            )
        return self._texts.get(room_id, [])


class Scenario:
    """The three homeservers and the steps of the demo, each a method."""

    def __init__(
        self,
        directory: Path,
        new_database: Callable[[], dict[str, Any] | None] = lambda: None,
        relay_workers: bool = False,
    ) -> None:
        """`new_database` gives each homeserver's `database:` (None: SQLite);
        `relay_workers`: R runs as a worker deployment (PostgreSQL only)."""
        self.directory = directory
        cert = make_self_signed_cert(directory / "tls")

        def homeserver(name: str) -> Homeserver:
            place: dict[str, Any] = {
                "workdir": directory / name,
                "port": free_port(),
                "cert": cert,
                "database": new_database(),
            }
            if name == "R" and relay_workers:
                return WorkerHomeserver(**place, federation_worker=R_ADDRESS_WORKER)
            return Homeserver(**place)

        # Server names are fixed by their ports, which every config needs first.
        self.a, self.r, self.b = (homeserver(name) for name in ("A", "R", "B"))
        self.a.module_config = {
            "send": {"relays": {self.b.server_name: [self.r.server_name]}}
        }
        self.r.module_config = {
            "relay": {"enabled": True, "destinations": [self.b.server_name]}
        }
        self.b.module_config = {
            "receive": {"relays": [self.r.server_name], "poll_interval": POLL_INTERVAL}
        }
        self.room_id = ""
        self.sent: list[str] = []

    @property
    def homeservers(self) -> tuple[Homeserver, Homeserver, Homeserver]:
        return self.a, self.r, self.b

    def start(self, homeserver: Homeserver) -> float:
        started = time.monotonic()
        homeserver.start()
        return time.monotonic() - started

    def start_and_join(self) -> None:
        """Start the three homeservers and bring alice and bob into one room."""
        for homeserver in self.homeservers:
            homeserver.start()
        self.setup_users()
        self.join_room()

    def setup_users(self) -> None:
        self.alice = User(self.a, "alice")
        self.bob = User(self.b, "bob")
        self.relay_admin = User(self.r, "admin", admin=True)

    def join_room(self) -> None:
        """alice creates a room and invites bob, who joins over federation."""
        self.room_id = self.alice.create_room(invite=self.bob.user_id)
        _wait(lambda: self._invited(), f"bob's invite to reach {self.b.server_name}")
        self.bob.join(self.room_id)
        # Synapse joins remote rooms with partial state and fetches the rest from A
        # in the background; /members answers once that is done. B must not go
        # offline before: a partial-state room waits for A to complete it.
        self.bob.call("GET", f"/rooms/{quote(self.room_id)}/members")
        _wait(
            lambda: self.bob.user_id in self.alice.members(self.room_id),
            f"bob's join to reach {self.a.server_name}",
        )

    def _invited(self) -> bool:
        sync = self.bob.call("GET", "/sync", timeout=0)
        return self.room_id in sync.get("rooms", {}).get("invite", {})

    def queued_for_b(self) -> int:
        response = self.r.client(
            "GET", "/_synapse/relay/v1/queues", token=self.relay_admin.token
        )
        if not response.ok:
            raise StepFailed(f"R's admin API answered {response.status_code}")
        for queue in response.json()["queues"]:
            if queue["destination"] == self.b.server_name:
                return int(queue["transactions"])
        return 0

    def send_while_b_offline(self, number: int) -> float:
        """alice sends message `number`; returns the seconds until R holds it."""
        before = self.queued_for_b()
        text = f"message {number} from alice, sent while B was offline"
        started = time.monotonic()
        self.alice.send_text(self.room_id, text)
        self.sent.append(text)
        _wait(
            lambda: self.queued_for_b() > before,
            f"message {number} to be deposited on R",
        )
        return time.monotonic() - started

    def received(self) -> list[str]:
        return [t for t in self.bob.texts(self.room_id) if t in self.sent]

    def wait_for_message(self, index: int) -> None:
        _wait(
            lambda: len(self.received()) > index,
            f"message {index + 1} to reach bob through R",
        )

    def stop_all(self) -> None:
        for homeserver in self.homeservers:
            homeserver.stop()


def process_name(process: SynapseProcess) -> str:
    """A process of R's worker deployment, as the demo names it."""
    return process.name if isinstance(process, Worker) else "main"


def process_roles(r: WorkerHomeserver) -> Iterator[tuple[str, str, str]]:
    """(name, address, what it does) for each process of R's worker deployment."""
    yield "main", r.base_url, "client and admin API, replication"
    for worker in r.workers.values():
        roles = []
        if "federation" in worker.spec.resources:
            roles.append("federation reader")
            if r.server_name.endswith(f":{worker.port}"):
                roles.append(f"R's address {r.server_name}")
        if FEDERATION_SENDER in worker.spec.duties:
            roles.append("federation sender")
        if BACKGROUND_TASKS in worker.spec.duties:
            roles.append("background tasks: push, purge")
        if "client" in worker.spec.resources:
            roles.append("admin API")
        yield worker.name, worker.base_url, ", ".join(roles)
    yield "Redis", f"{r.redis.host}:{r.redis.port}", "replication between them"


def relay_activity(r: WorkerHomeserver, destination: str) -> dict[str, Counter[str]]:
    """What each process of R did for `destination`, from its log: Synapse's access
    log has a line per request served, the pusher one per entry pushed."""
    signs = {
        "deposits accepted": (f' 200 "PUT {FEDERATION_PREFIX}/send_relay/',),
        "collections served": (
            f'"GET {relay_txn_path(destination)}',
            f" {collect_path(destination)}",
        ),
        "entries pushed to B": ("Pushed transaction ",),
    }
    activity = {}
    for process in (r, *r.workers.values()):
        log = process.log_path.read_text(errors="replace").splitlines()
        counts = Counter(dict.fromkeys(signs, 0))  # in this order
        counts.update(
            what
            for line in log
            for what, patterns in signs.items()
            if any(pattern in line for pattern in patterns)
        )
        activity[process_name(process)] = +counts  # without the zeros
    return activity


def _wait(predicate: Callable[[], Any], what: str) -> None:
    try:
        wait_until(predicate, STEP_TIMEOUT, interval=0.05, message=what)
    except TimeoutError as e:
        raise StepFailed(str(e)) from None


class Narrator:
    """Prints the demo's steps for people."""

    def __init__(self, out: TextIO, steps: int) -> None:
        self._out = out
        self._steps = steps
        self._step = 0

    def step(self, text: str) -> None:
        self._step += 1
        self.say(f"\n[{self._step}/{self._steps}] {text}", indent="")

    @property
    def current(self) -> int:
        return self._step

    def say(self, text: str, indent: str = "      ") -> None:
        print(indent + text, file=self._out, flush=True)


def run(scenario: Scenario, messages: int, keep: bool, out: TextIO) -> None:
    """Run the whole demo; raises StepFailed when a step fails."""
    say = Narrator(out, steps=6)
    a, r, b = scenario.homeservers
    say.step(f"Starting three homeservers in {scenario.directory}")
    say.say(f"A  {a.server_name:<17} sender: falls back to B's relay R")
    say.say(f"R  {r.server_name:<17} relay: holds mail for B")
    say.say(f"B  {b.server_name:<17} recipient: collects from R every {POLL_INTERVAL}")
    for name, homeserver in zip("ARB", scenario.homeservers, strict=True):
        say.say(f"{name} is up after {scenario.start(homeserver):.1f}s")
        if isinstance(homeserver, WorkerHomeserver):
            say.say("R runs as a worker deployment on PostgreSQL:")
            for process, address, roles in process_roles(homeserver):
                say.say(f"  {process:<12} {address:<24} {roles}")

    say.step("alice@A creates a room; bob@B joins it while everyone is online")
    scenario.setup_users()
    scenario.join_room()
    say.say(f"room {scenario.room_id}: alice and bob are both in it")

    say.step(f"B goes offline; alice sends {messages} messages")
    b.stop()
    for number in range(1, messages + 1):
        seconds = scenario.send_while_b_offline(number)
        say.say(f"message {number} deposited on R {seconds:.2f}s after alice sent it")
    say.say(f"R holds {scenario.queued_for_b()} transactions for B")

    say.step("A goes offline too; B comes back")
    a.stop()
    started = time.monotonic()
    scenario.start(b)
    say.say(f"B is up after {time.monotonic() - started:.1f}s; A is still offline")

    say.step("bob receives the messages through R")
    for index in range(messages):
        scenario.wait_for_message(index)
        say.say(
            f"message {index + 1} in bob's timeline"
            f" {time.monotonic() - started:.2f}s after B started"
        )
    received = scenario.received()
    if received != scenario.sent:
        raise StepFailed(f"bob's timeline has {received}, expected {scenario.sent}")
    _wait(lambda: scenario.queued_for_b() == 0, "R's queue for B to be empty")

    say.step("Summary")
    say.say(
        f"{messages}/{messages} messages crossed from alice to bob through R, in"
        " order, while B was offline and then A was offline."
    )
    say.say("R's queue for B is empty: every entry was acknowledged after processing.")
    if isinstance(r, WorkerHomeserver):
        say.say("What R's processes did (from their logs):")
        for process, counts in relay_activity(r, b.server_name).items():
            if counts:
                done = ", ".join(f"{what}: {n}" for what, n in counts.items())
                say.say(f"  {process:<12} {done}")
    if keep:
        scenario.start(a)


def report_kept(
    scenario: Scenario, postgres: PostgresCluster | None, out: TextIO
) -> None:
    """Say what keeps running (--keep): each process, how to stop and restart it."""
    say = Narrator(out, steps=0)
    say.say("\nStill running (--keep):", indent="")
    for name, homeserver, user in (
        ("A", scenario.a, scenario.alice),
        ("R", scenario.r, scenario.relay_admin),
        ("B", scenario.b, scenario.bob),
    ):
        # Synapse started with --daemonize writes its pid there too.
        homeserver.pid_path.write_text(f"{homeserver.pid}\n")
        restart = " ".join(
            [
                *(f"{k}={shlex.quote(v)}" for k, v in homeserver.environment().items()),
                shlex.join([*homeserver.command(), "--daemonize"]),
            ]
        )
        say.say(f"{name}  {homeserver.server_name}, pid {homeserver.pid}", indent="")
        say.say(f"client API {homeserver.base_url} (certificate: self-signed)")
        say.say(f"user {user.user_id}, password {user.password}")
        say.say(f"log      {homeserver.log_path}")
        say.say(f"stop:    kill $(cat {shlex.quote(str(homeserver.pid_path))})")
        say.say(f"restart: cd {shlex.quote(str(homeserver.workdir))} && {restart}")
        if isinstance(homeserver, WorkerHomeserver):
            report_kept_workers(homeserver, say)
    if postgres is not None:
        say.say(
            f"PostgreSQL  {postgres.host}:{postgres.port} (databases of A, R and B),"
            f" data in {postgres.datadir}",
            indent="",
        )
        say.say(f"log      {postgres.log_path}")
        say.say(f"stop:    {shlex.join(postgres.control('stop'))}")
        say.say(f"restart: {shlex.join(postgres.control('start'))}")
    say.say(
        f"Remove {scenario.directory} once all are stopped"
        + (" (PostgreSQL last: the homeservers need it)." if postgres else "."),
        indent="",
    )


def report_kept_workers(r: WorkerHomeserver, say: Narrator) -> None:
    """R's workers and Redis (--keep --workers): each with its log and how to stop
    it; R's main process restarts alone, with them running."""
    kept: dict[str, Worker | RedisServer] = {**r.workers, "Redis": r.redis}
    for name, address, roles in process_roles(r):
        process = kept.get(name)
        if process is None:  # the main process, reported as R
            continue
        process.pid_path.write_text(f"{process.pid}\n")
        say.say(f"R  {name} {address} ({roles}), pid {process.pid}", indent="")
        say.say(f"log      {process.log_path}")
        say.say(f"stop:    kill $(cat {shlex.quote(str(process.pid_path))})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--messages",
        type=int,
        default=3,
        metavar="N",
        help="how many messages alice sends (default 3)",
    )
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="use a throwaway PostgreSQL server (under --dir) instead of SQLite",
    )
    parser.add_argument(
        "--workers",
        action="store_true",
        help="run R as a Synapse worker deployment (a main process, two federation"
        " readers, a federation sender, a background-tasks worker and a throwaway"
        " Redis); implies --postgres, needs redis-server",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="leave the homeservers (and PostgreSQL, Redis) running to explore"
        " them, and say how to stop and restart each",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        help="where to put the homeservers (default: a new temp dir, removed"
        " afterwards unless --keep)",
    )


DESCRIPTION = (
    "Three real homeservers on loopback show a message crossing through a relay"
    " while its recipient, then its sender, is offline."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="synapse-relay demo", description=DESCRIPTION)
    add_arguments(parser)
    return run_command(parser, parser.parse_args(argv))


def run_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run the demo as the command line asked; the process's exit code."""
    if args.messages < 1:
        parser.error("--messages must be at least 1")
    args.postgres = args.postgres or args.workers
    missing = missing_requirement(args)
    if missing:
        raise SystemExit(missing)
    out = sys.stdout
    directory = args.dir or Path(tempfile.mkdtemp(prefix="synapse-relay-demo-"))
    directory.mkdir(parents=True, exist_ok=True)
    if args.postgres and os.geteuid() == 0:
        directory.chmod(0o755)  # PostgreSQL runs as `postgres` and lives in it
    print("synapse-relay demo: a relay carries alice's messages to bob", file=out)
    succeeded = False
    with terminated_as_interrupt(), _postgres(args.postgres, directory) as postgres:
        scenario = Scenario(
            directory,
            postgres.create_database if postgres else lambda: None,
            relay_workers=args.workers,
        )
        try:
            run(scenario, args.messages, args.keep, out)
            succeeded = True
        except (StepFailed, RuntimeError) as e:
            print(
                f"\ndemo failed: {e}\nhomeserver logs: {directory}/*/homeserver.log",
                file=out,
            )
            return 1
        except KeyboardInterrupt:
            print("\ninterrupted: stopping everything the demo started", file=out)
            return 130
        finally:
            if not (args.keep and succeeded):
                scenario.stop_all()
                if postgres is not None:
                    postgres.stop()
        if args.keep:
            report_kept(scenario, postgres, out)
    if not args.keep and args.dir is None:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


def missing_requirement(args: argparse.Namespace) -> str | None:
    """What the options need and this machine lacks, as a one-line error."""
    option = "--workers" if args.workers else "--postgres"
    if args.postgres and not PostgresCluster.available():
        return (
            f"{option} needs PostgreSQL installed (on Debian: apt-get install"
            " postgresql)"
        )
    if args.workers and not RedisServer.available():
        return "--workers needs Redis (on Debian: apt-get install redis-server)"
    return None


@contextmanager
def _postgres(enabled: bool, directory: Path) -> Iterator[PostgresCluster | None]:
    """A throwaway PostgreSQL server in `directory`/postgres, started; whoever
    keeps it running stops it."""
    if not enabled:
        yield None
        return
    cluster = PostgresCluster(directory=directory / "postgres")
    try:
        cluster.start()  # (on failure, it stops and removes what it started)
    except PostgresError as e:
        hint = (
            "\n(as root, PostgreSQL runs as the postgres user: --dir and the"
            " directories above it must be open to it)"
            if os.geteuid() == 0
            else ""
        )
        raise SystemExit(f"demo failed: PostgreSQL did not start: {e}{hint}") from None
    yield cluster
