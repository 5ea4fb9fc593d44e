"""Homeservers for test modules: the real processes of `synapse_relay.loopback`,
created on a database backend and all stopped together."""

import re
import sqlite3
import tempfile
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg2

from synapse_relay.loopback import (
    DEFAULT_PASSWORD,
    Homeserver,
    HomeserverError,
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


def log_problems(homeserver: Homeserver) -> list[str]:
    """The lines of `homeserver`'s log that a healthy homeserver never logs."""
    with homeserver.log_path.open(encoding="utf-8", errors="replace") as log:
        return [line.rstrip("\n") for line in log if _PROBLEM.search(line)]


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
