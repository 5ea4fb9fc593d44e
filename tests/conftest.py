"""Fixtures for tests that run real servers; see tests/harness/README.md."""

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from synapse_relay.loopback import make_self_signed_cert
from tests.harness.fedclient import FakeServerFactory
from tests.harness.homeserver import Homeserver, HomeserverFactory, RedisServer
from tests.harness.postgres import Backend, PostgresCluster
from tests.harness.summary import RunSummary

_summary = RunSummary()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: starts real homeservers")
    config.addinivalue_line(
        "markers", "workers: starts a Synapse worker deployment (PostgreSQL, Redis)"
    )


def pytest_collection_finish(session: pytest.Session) -> None:
    _summary.collected(session.items)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _summary.record(report)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """End the run saying how many PostgreSQL and worker tests ran, or why not."""
    for line in _summary.lines():
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(certificate, key) for localhost and 127.0.0.1, shared by all servers."""
    return make_self_signed_cert(tmp_path_factory.mktemp("tls"))


def require(available: bool, reason: str) -> None:
    """Skip the test unless `available`; fail instead when CI is set."""
    if available:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so this is an error", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """One real PostgreSQL server for the session, started on first use."""
    require(
        PostgresCluster.available(),
        "PostgreSQL binaries not found (pg_config --bindir, "
        "/usr/lib/postgresql/*/bin): apt-get install postgresql",
    )
    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def postgres_factory(
    pg_cluster: PostgresCluster,
    tls_cert: tuple[Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[HomeserverFactory]:
    """Homeservers on PostgreSQL only (for tests of what needs it: workers), with
    Redis for `create_with_workers`; all stopped after the test module."""
    require(
        RedisServer.available(),
        "redis-server not found (Synapse workers need Redis):"
        " apt-get install redis-server",
    )
    factory = HomeserverFactory(
        tmp_path_factory.mktemp("homeservers-workers"),
        tls_cert,
        Backend.postgres(pg_cluster),
    )
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each database backend in turn; call it for a new homeserver's `database:`
    section (None for SQLite, a fresh PostgreSQL database otherwise)."""
    if request.param == "postgres":
        return Backend.postgres(request.getfixturevalue("pg_cluster"))
    return Backend.sqlite()


@pytest.fixture(scope="module")
def homeserver_factory(
    backend: Backend,
    tls_cert: tuple[Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[HomeserverFactory]:
    """Homeservers on `backend` for a test module (its tests run once per
    backend), all stopped after the module's tests on that backend."""
    factory = HomeserverFactory(
        tmp_path_factory.mktemp(f"homeservers-{backend}"), tls_cert, backend
    )
    yield factory
    factory.stop_all()


@pytest.fixture
def make_homeserver(
    tls_cert: tuple[Path, Path], tmp_path: Path
) -> Iterator[Callable[..., Homeserver]]:
    """`make_homeserver(module_config, extra_config=None, backend=None)`: a started
    homeserver (SQLite unless a backend is given), stopped after the test."""
    factory = HomeserverFactory(tmp_path / "homeservers", tls_cert)

    def make(
        module_config: dict[str, Any] | None,
        extra_config: dict[str, Any] | None = None,
        backend: Backend | None = None,
    ) -> Homeserver:
        return factory.create(module_config, extra_config, backend=backend)

    yield make
    factory.stop_all()


@pytest.fixture(scope="session")
def fake_server_factory(tls_cert: tuple[Path, Path]) -> Iterator[FakeServerFactory]:
    """`.create()` gives a started FakeServer; all are stopped after the session."""
    factory = FakeServerFactory(tls_cert)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="session")
def fake_servers(fake_server_factory: FakeServerFactory) -> FakeServerFactory:
    """Another name for `fake_server_factory`."""
    return fake_server_factory
