"""The database `Backend` (SQLite, or a database of a real PostgreSQL server) that
integration tests are parametrized with."""

from collections.abc import Callable
from typing import Any

from synapse_relay.loopback import PostgresCluster, PostgresError

__all__ = ["Backend", "PostgresCluster", "PostgresError"]


class Backend:
    """A database backend for homeservers: calling it gives the `database:`
    section for a new homeserver (None = SQLite in the homeserver's directory,
    else a fresh database of `cluster`)."""

    def __init__(
        self, name: str, new_database: Callable[[], dict[str, Any] | None]
    ) -> None:
        self.name = name
        self._new_database = new_database

    @classmethod
    def sqlite(cls) -> "Backend":
        return cls("sqlite", lambda: None)

    @classmethod
    def postgres(cls, cluster: PostgresCluster) -> "Backend":
        return cls("postgres", cluster.create_database)

    def __call__(self) -> dict[str, Any] | None:
        return self._new_database()

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<Backend {self.name}>"
