"""What the benchmarks share: options, signed federation sessions, a bounded load
generator, realistic transactions, statistics and CPU accounting.

Servers come from `synapse_relay.loopback` (real Synapse processes on loopback) and
signatures from `synapse_relay.fake_federation.FakeServer`; nothing here starts a server
of its own except the key servers of FakeServers.
"""

import http.client
import itertools
import json
import math
import os
import random
import sqlite3
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from canonicaljson import encode_canonical_json

from synapse_relay.fake_federation import FakeServer
from synapse_relay.loopback import Homeserver, PostgresCluster, wait_until
from synapse_relay.protocol import relay_txn_path

# A request of a benchmark that takes longer than this is an error.
REQUEST_TIMEOUT = 60
# How often a benchmark looks at a database to see whether something happened.
POLL_INTERVAL = 0.002


@dataclass
class Options:
    """Sizes and switches of one benchmark run (see `bench.runner`)."""

    smoke: bool = False
    # figure 1: messages per case
    fallback_messages: int = 50
    # figure 1: direct attempts before A relays (None: the module's default)
    attempts_before_relay: int | None = None
    # figure 3: messages A sends to B
    messages: int = 1000
    # figures 2 and 4: seconds of load per measured phase, after a warm-up
    duration: float = 10.0
    warmup: float = 2.0
    # figures 2 and 4: requests in flight at once
    concurrency: int = 64
    # figures 2 and 4: the loads take turns this many times (each for
    # duration / rounds), so that other activity on the machine weighs on all
    # of them alike
    rounds: int = 2
    # figure 4: entries queued for other destinations, and how many destinations
    backlog: int = 1_000_000
    backlog_destinations: int = 1000
    # figure 4: entries collected to measure the collect rate
    collect_entries: int = 2000
    backends: tuple[str, ...] = ("sqlite", "postgres")
    # write py-spy profiles of the servers under load here (None: do not profile)
    profile_dir: Path | None = None


@dataclass
class Context:
    """What every figure gets from the runner."""

    options: Options
    root: Path
    cert: tuple[Path, Path]
    postgres: Callable[[], PostgresCluster]
    log: Callable[[str], None]

    def directory(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def new_database(self, backend: str) -> dict[str, Any] | None:
        """A `database:` section for a new homeserver on `backend`."""
        if backend == "sqlite":
            return None
        if backend == "postgres":
            return self.postgres().create_database()
        raise ValueError(f"unknown backend {backend!r}")


# --- statistics -------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summary(values: list[float]) -> dict[str, float]:
    """p50, p95, p99 and max of `values` (seconds), and how many there are."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values),
    }


def ratio(value: float, baseline: float) -> float | None:
    return value / baseline if baseline > 0 else None


# --- CPU time of processes --------------------------------------------------


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time a process has used so far (0 if it is gone)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / _TICKS


# --- signed federation requests ----------------------------------------------


_TLS = ssl.create_default_context()
_TLS.check_hostname = False
_TLS.verify_mode = ssl.CERT_NONE  # every loopback homeserver is self-signed


@dataclass
class Response:
    status_code: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class SignedSession:
    """Federation requests from `signer`'s identity (or `origin`, when `signer`
    holds that server's key) to one homeserver, over one kept-alive connection.

    Signatures are `FakeServer.authorization`'s; a GET's `content` is sent and
    signed as Dendrite's relay client (and this module's collector) does. Plain
    `http.client` rather than `requests`: it costs the load generator a quarter
    of the CPU time per request, which keeps it from being the bottleneck.
    """

    def __init__(
        self, signer: FakeServer, destination: Homeserver, origin: str | None = None
    ) -> None:
        self._signer = signer
        self._destination = destination
        self._origin = origin
        url = urllib.parse.urlsplit(destination.base_url)
        self._host = url.hostname or "127.0.0.1"
        self._port = url.port or 443
        self._connection: http.client.HTTPSConnection | None = None

    def request(self, method: str, path: str, content: Any = None) -> Response:
        headers = {
            "Authorization": self._signer.authorization(
                method,
                self._destination.server_name,
                path,
                content,
                origin=self._origin,
            )
        }
        body = None
        if content is not None:
            body = encode_canonical_json(content)
            headers["Content-Type"] = "application/json"
        if self._connection is None:
            self._connection = http.client.HTTPSConnection(
                self._host, self._port, context=_TLS, timeout=REQUEST_TIMEOUT
            )
        try:
            self._connection.request(method, path, body=body, headers=headers)
            response = self._connection.getresponse()
            return Response(response.status, response.read())
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class AdminSession:
    """Client-API requests with an access token, over a kept-alive connection."""

    def __init__(self, homeserver: Homeserver, token: str) -> None:
        self._homeserver = homeserver
        self._session = requests.Session()
        self._session.headers["Authorization"] = f"Bearer {token}"

    def call(
        self, method: str, path: str, body: Any = None, timeout: float = 60
    ) -> Any:
        response = self._session.request(
            method,
            self._homeserver.base_url + path,
            json=body,
            verify=False,
            timeout=timeout,
        )
        if response.status_code != 200:
            raise BenchError(
                f"{method} {path} on {self._homeserver.server_name} answered"
                f" {response.status_code} {response.text[:300]}"
            )
        return response.json()

    def close(self) -> None:
        self._session.close()


class BenchError(RuntimeError):
    """Something a benchmark relies on did not happen."""


# --- bounded concurrent load ------------------------------------------------


# A worker sends request number i and returns the HTTP status it got.
Worker = Callable[[int], int]
# Closes what a worker opened (its connection).
Closer = Callable[[], None]


@dataclass
class LoadResult:
    requests: int
    errors: dict[str, int]
    seconds: float
    latencies: list[float]
    server_cpu: float
    client_cpu: float

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @classmethod
    def merge(cls, parts: list["LoadResult"]) -> "LoadResult":
        """One result for several runs of the same load."""
        errors: dict[str, int] = {}
        for part in parts:
            for kind, count in part.errors.items():
                errors[kind] = errors.get(kind, 0) + count
        return cls(
            requests=sum(p.requests for p in parts),
            errors=errors,
            seconds=sum(p.seconds for p in parts),
            latencies=[latency for p in parts for latency in p.latencies],
            server_cpu=sum(p.server_cpu for p in parts),
            client_cpu=sum(p.client_cpu for p in parts),
        )

    def to_json(self) -> dict[str, Any]:
        lat = summary(self.latencies)
        return {
            "requests": self.requests,
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "per_second": round(self.per_second, 1),
            "latency_p50_ms": round(lat.get("p50", 0) * 1000, 2),
            "latency_p99_ms": round(lat.get("p99", 0) * 1000, 2),
            # share of one core the server used (100: saturated)
            "server_cpu_percent": round(
                100 * self.server_cpu / max(self.seconds, 1e-9)
            ),
            "server_cpu_ms_per_request": round(
                1000 * self.server_cpu / max(self.requests, 1), 3
            ),
            "client_cpu_ms_per_request": round(
                1000 * self.client_cpu / max(self.requests, 1), 3
            ),
        }


def run_load(
    make_worker: Callable[[int], tuple[Worker, Closer]],
    *,
    concurrency: int,
    duration: float,
    expected_status: int,
    server_pid: int | None,
    max_requests: int = 10_000_000,
) -> LoadResult:
    """`concurrency` threads, each with its own worker from `make_worker(thread)`
    (a request function and its close function), send requests numbered from 0
    until `duration` seconds have passed or `max_requests` were sent. Returns
    throughput, latencies and the CPU time the server process and this process
    used meanwhile. A status other than `expected_status`, or an exception, is
    counted as an error (and not in the throughput)."""
    counter = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    errors: dict[str, int] = {}
    ok = 0
    last_end = 0.0
    stop = threading.Event()
    start = time.monotonic()
    deadline = start + duration

    def loop(thread: int) -> None:
        nonlocal ok, last_end
        worker, close = make_worker(thread)
        mine: list[float] = []
        try:
            while not stop.is_set():
                number = next(counter)
                if number >= max_requests or time.monotonic() >= deadline:
                    return
                began = time.monotonic()
                try:
                    status = worker(number)
                    error = None if status == expected_status else f"HTTP {status}"
                except Exception as e:  # counted, the load goes on
                    error = type(e).__name__
                ended = time.monotonic()
                with lock:
                    if error is None:
                        ok += 1
                        mine.append(ended - began)
                    else:
                        errors[error] = errors.get(error, 0) + 1
                    last_end = max(last_end, ended)
        finally:
            close()
            with lock:
                latencies.extend(mine)

    server_cpu = cpu_seconds(server_pid)
    client_cpu = time.process_time()
    threads = [
        threading.Thread(target=loop, args=(i,), name=f"bench-load-{i}", daemon=True)
        for i in range(concurrency)
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.1)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return LoadResult(
        requests=ok,
        errors=errors,
        seconds=max(last_end, start) - start,
        latencies=latencies,
        server_cpu=cpu_seconds(server_pid) - server_cpu,
        client_cpu=time.process_time() - client_cpu,
    )


def collect_mailbox(
    owner: FakeServer, relay: Homeserver, limit: int
) -> tuple[int, float, float]:
    """`owner` fetches up to `limit` entries of its mailbox on `relay`, one
    request at a time, acknowledging each in the next request as a collector
    does, and the last one in a final request. Returns (entries fetched,
    seconds, the relay's CPU seconds)."""
    session = SignedSession(owner, relay)
    path = relay_txn_path(owner.server_name)
    fetched = 0
    acknowledge = 0
    relay_cpu = cpu_seconds(relay.pid)
    started = time.monotonic()
    try:
        while fetched < limit:
            response = session.request("GET", path, {"entry_id": acknowledge})
            if response.status_code != 200:
                raise BenchError(f"relay_txn answered {response.status_code}")
            answer = response.json()
            if not answer["entries_queued"]:
                break
            fetched += 1
            acknowledge = answer["entry_id"]
        if acknowledge:
            session.request("GET", path, {"entry_id": acknowledge})
    finally:
        session.close()
    return fetched, time.monotonic() - started, cpu_seconds(relay.pid) - relay_cpu


# --- realistic transactions -------------------------------------------------

_B64 = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/"


def _b64(rng: random.Random, length: int) -> str:
    """Random base64 characters, as in hashes, signatures and event ids."""
    return "".join(rng.choices(_B64, k=length))


def _words(rng: random.Random, length: int) -> str:
    """`length` characters of random lower-case words."""
    text = " ".join(
        "".join(rng.choices("etaoinshrdlucmfwypvbgkjqxz", k=rng.randint(2, 9)))
        for _ in range(length // 3)
    )
    return text[:length]


def realistic_transaction(
    origin: str, destination: str, number: int, now_ms: int
) -> dict[str, Any]:
    """A federation transaction as Synapse sends one for a chat message: one
    m.room.message PDU of about 1.5 KB (room version 10 shape: hashes, signatures,
    auth and prev events) and three EDUs (typing, read receipt, presence), about
    2 KB of canonical JSON in all. The relay does not check PDUs, so the event need
    not be valid."""
    rng = random.Random(number)
    room_id = f"!{_b64(random.Random(0), 18)}:{origin}"
    sender = f"@alice:{origin}"
    pdu = {
        "auth_events": [f"${_b64(rng, 43)}" for _ in range(3)],
        "content": {"body": _words(rng, 840), "msgtype": "m.text"},
        "depth": 100 + number,
        "hashes": {"sha256": _b64(rng, 43)},
        "origin_server_ts": now_ms,
        "prev_events": [f"${_b64(rng, 43)}"],
        "room_id": room_id,
        "sender": sender,
        "signatures": {origin: {"ed25519:a_Abcd": _b64(rng, 86)}},
        "type": "m.room.message",
        "unsigned": {"age_ts": now_ms},
    }
    edus = [
        {
            "edu_type": "m.typing",
            "content": {"room_id": room_id, "user_id": sender, "typing": False},
        },
        {
            "edu_type": "m.receipt",
            "content": {
                room_id: {
                    "m.read": {
                        sender: {
                            "event_ids": [f"${_b64(rng, 43)}"],
                            "data": {"ts": now_ms},
                        }
                    }
                }
            },
        },
        {
            "edu_type": "m.presence",
            "content": {
                "push": [
                    {
                        "user_id": sender,
                        "presence": "online",
                        "last_active_ago": 1000,
                        "currently_active": True,
                    }
                ]
            },
        },
    ]
    return {
        "origin": origin,
        "origin_server_ts": now_ms,
        "destination": destination,
        "pdus": [pdu],
        "edus": edus,
    }


def json_size(value: Any) -> int:
    return len(encode_canonical_json(value))


# --- databases ----------------------------------------------------------------


def sqlite_path(homeserver: Homeserver) -> Path:
    """The SQLite database file of a homeserver started without `database`."""
    if homeserver.database is not None:
        raise BenchError(f"{homeserver} does not use SQLite")
    return homeserver.workdir / "homeserver.db"


@contextmanager
def sqlite_reader(homeserver: Homeserver) -> Iterator[sqlite3.Connection]:
    """A read-only connection to a (running or stopped) homeserver's SQLite
    database; Synapse uses WAL mode, so reading never blocks it."""
    uri = f"file:{sqlite_path(homeserver)}?mode=ro"
    connection = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None)
    try:
        yield connection
    finally:
        connection.close()


def database_bytes(homeserver: Homeserver) -> int:
    """Size of a SQLite homeserver's database files (main file and WAL)."""
    path = sqlite_path(homeserver)
    return sum(
        p.stat().st_size
        for p in (path, path.with_name(path.name + "-wal"))
        if p.exists()
    )


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll `predicate` until it returns something truthy; BenchError on timeout."""
    try:
        return wait_until(predicate, timeout, interval, message=what)
    except TimeoutError as e:
        raise BenchError(str(e)) from None


@dataclass
class Servers:
    """Homeservers and fake servers a figure started, all stopped by `stop_all`."""

    homeservers: list[Homeserver] = field(default_factory=list)
    fakes: list[FakeServer] = field(default_factory=list)

    def fake(self, cert: tuple[Path, Path]) -> FakeServer:
        server = FakeServer(cert).start()
        self.fakes.append(server)
        return server

    def stop_all(self) -> None:
        for homeserver in self.homeservers:
            homeserver.stop()
        for fake in self.fakes:
            fake.stop()
