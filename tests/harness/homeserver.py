"""Homeservers for test modules: the real processes of `synapse_relay.loopback`,
created on a database backend and all stopped together."""

import re
import sqlite3
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg2

from synapse_relay.loopback import (
    DEFAULT_PASSWORD,
    Homeserver,
    HomeserverError,
    SynapseProcess,
    free_port,
    tail,
    wait_until,
)
from synapse_relay.loopback_workers import (
    STANDARD_WORKERS,
    RedisServer,
    WorkerHomeserver,
    WorkerSpec,
)

__all__ = [
    "DEFAULT_PASSWORD",
    "Homeserver",
    "HomeserverError",
    "HomeserverFactory",
    "RedisServer",
    "WorkerHomeserver",
    "WorkerSpec",
    "free_port",
    "log_problems",
    "send_text",
    "shared_room",
    "start_all",
    "run_sql",
    "select",
    "tail",
    "wait_until",
]


# What a healthy homeserver never logs: an ERROR (or worse), a traceback or stack,
# or Synapse's complaints about logcontexts misused (synapse/logging/context.py).
_PROBLEM = re.compile(
    r" - (ERROR|CRITICAL) - "
    r"|(Traceback|Stack) \(most recent call last\)"
    r"|Re-starting finished log context"
    r"|Expected logging context .* was lost"
    r"|without recording a start rusage"
)


def log_problems(homeserver: SynapseProcess) -> list[str]:
    """The lines of `homeserver`'s log (a main process or a worker) that a healthy
    homeserver never logs."""
    with homeserver.log_path.open(encoding="utf-8", errors="replace") as log:
        return [line.rstrip("\n") for line in log if _PROBLEM.search(line)]


def start_all(homeservers: Sequence[Homeserver]) -> None:
    """Start homeservers (which may be worker deployments) in parallel."""
    with ThreadPoolExecutor(len(homeservers) or 1) as pool:
        for future in [pool.submit(hs.start) for hs in homeservers]:
            future.result()


def shared_room(
    creator: Homeserver, creator_token: str, joiners: Sequence[tuple[Homeserver, str]]
) -> str:
    """A public room created on `creator` that each (homeserver, token) of
    `joiners` joined over federation; its id."""
    response = creator.client(
        "POST",
        "/_matrix/client/v3/createRoom",
        creator_token,
        {"preset": "public_chat"},
    )
    assert response.status_code == 200, response.text
    room: str = response.json()["room_id"]
    for homeserver, token in joiners:
        response = homeserver.client(
            "POST",
            f"/_matrix/client/v3/join/{quote(room)}",
            token,
            {},
            params={"server_name": creator.server_name},
        )
        assert response.status_code == 200, response.text
    return room


def send_text(homeserver: Homeserver, token: str, room: str, text: str) -> str:
    """Say `text` in `room`; the event id."""
    response = homeserver.client(
        "PUT",
        f"/_matrix/client/v3/rooms/{quote(room)}/send/m.room.message/{time.time_ns()}",
        token,
        json={"msgtype": "m.text", "body": text},
    )
    assert response.status_code == 200, response.text
    event_id: str = response.json()["event_id"]
    return event_id


def run_sql(homeserver: Homeserver, statement: str, params: tuple = ()) -> list:
    """Run one statement (`?` placeholders) on the homeserver's database, SQLite
    or PostgreSQL, in its own committed transaction; the rows it returns."""
    if homeserver.database is None:
        path = homeserver.workdir / "homeserver.db"
        with closing(sqlite3.connect(path)) as connection, connection:
            return connection.execute(statement, params).fetchall()
    args = homeserver.database["args"]
    connection = psycopg2.connect(
        host=args["host"], port=args["port"], user=args["user"], dbname=args["database"]
    )
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute(statement.replace("?", "%s"), params)
            return cursor.fetchall() if cursor.description else []
    finally:
        connection.close()


def select(homeserver: Homeserver, statement: str, *params: Any) -> list[tuple]:
    """The rows of a query (`?` placeholders) on `homeserver`'s database, read
    directly, beside the running homeserver."""
    return run_sql(homeserver, statement, params)


DatabaseFactory = Callable[[], dict[str, Any] | None]


class HomeserverFactory:
    """Creates started homeservers under `root` sharing one certificate, and stops
    them all in `stop_all()`. Cheap: make one per scope that needs cleaning up.
    `backend` (e.g. a `tests.harness.postgres.Backend`) makes each homeserver's
    database; None means SQLite."""

    def __init__(
        self,
        root: Path,
        cert: tuple[Path, Path],
        backend: DatabaseFactory | None = None,
    ) -> None:
        self.root = root
        self.cert = cert
        self.backend = backend
        self.homeservers: list[Homeserver] = []

    def create(
        self,
        module_config: dict[str, Any] | None = None,
        extra_config: dict[str, Any] | None = None,
        *,
        backend: DatabaseFactory | None = None,
        start: bool = True,
    ) -> Homeserver:
        """A new homeserver, started unless `start=False`, its database made by
        `backend`, else by the factory's backend."""
        backend = backend or self.backend
        self.root.mkdir(parents=True, exist_ok=True)
        homeserver = Homeserver(
            workdir=Path(tempfile.mkdtemp(prefix="hs-", dir=self.root)),
            port=free_port(),
            cert=self.cert,
            module_config=module_config,
            database=backend() if backend is not None else None,
            extra_config=extra_config,
        )
        self.homeservers.append(homeserver)
        if start:
            homeserver.start()
        return homeserver

    def create_with_workers(
        self,
        module_config: dict[str, Any] | None = None,
        extra_config: dict[str, Any] | None = None,
        *,
        workers: Sequence[WorkerSpec] = STANDARD_WORKERS,
        start: bool = True,
    ) -> WorkerHomeserver:
        """A new homeserver run as a main process and `workers`, with Redis; the
        factory's backend must be PostgreSQL."""
        database = self.backend() if self.backend is not None else None
        if database is None:
            raise HomeserverError("workers need a PostgreSQL backend")
        self.root.mkdir(parents=True, exist_ok=True)
        homeserver = WorkerHomeserver(
            workdir=Path(tempfile.mkdtemp(prefix="hs-workers-", dir=self.root)),
            port=free_port(),
            cert=self.cert,
            database=database,
            module_config=module_config,
            extra_config=extra_config,
            workers=workers,
        )
        self.homeservers.append(homeserver)
        if start:
            homeserver.start()
        return homeserver

    def stop_all(self) -> None:
        for homeserver in self.homeservers:
            homeserver.stop()
        self.homeservers.clear()
