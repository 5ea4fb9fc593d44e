"""Real homeservers, PostgreSQL and fake federation servers for integration tests
(see README.md in this directory)."""

from synapse_relay.loopback import make_self_signed_cert
from tests.harness.fedclient import FakeServer, FakeServerFactory, quote
from tests.harness.homeserver import (
    Homeserver,
    HomeserverError,
    HomeserverFactory,
    free_port,
    wait_until,
)
from tests.harness.postgres import Backend, PostgresCluster

__all__ = [
    "Backend",
    "FakeServer",
    "FakeServerFactory",
    "Homeserver",
    "HomeserverError",
    "HomeserverFactory",
    "PostgresCluster",
    "free_port",
    "make_self_signed_cert",
    "quote",
    "wait_until",
]
