"""The run's closing lines about PostgreSQL and worker tests
(tests/harness/summary.py)."""

from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from tests.harness.summary import RunSummary


@dataclass
class Callspec:
    params: dict[str, Any]


@dataclass
class Item:
    nodeid: str
    fixturenames: tuple[str, ...] = ()
    callspec: Callspec | None = None
    markers: tuple[str, ...] = field(default=())

    def get_closest_marker(self, name: str) -> object:
        return name if name in self.markers else None


def report(
    nodeid: str,
    when: Literal["setup", "call", "teardown"],
    outcome: Literal["passed", "failed", "skipped"],
    reason: str = "",
) -> pytest.TestReport:
    longrepr = (
        ("conftest.py", 1, f"Skipped: {reason}") if outcome == "skipped" else None
    )
    return pytest.TestReport(nodeid, ("x", 0, nodeid), {}, outcome, longrepr, when)


def test_counts_and_reasons() -> None:
    summary = RunSummary()
    items = [
        Item("a[sqlite]", callspec=Callspec({"backend": "sqlite"})),
        Item("a[postgres]", callspec=Callspec({"backend": "postgres"})),
        Item("b[postgres]", callspec=Callspec({"backend": "postgres"})),
        Item("c", fixturenames=("pg_cluster",)),
        Item("w", fixturenames=("pg_cluster",), markers=("workers",)),
    ]
    summary.collected(items)  # type: ignore[arg-type]
    for nodeid in ("a[sqlite]", "a[postgres]", "c"):
        summary.record(report(nodeid, "setup", "passed"))
        summary.record(report(nodeid, "call", "passed"))
        summary.record(report(nodeid, "teardown", "passed"))
    summary.record(report("b[postgres]", "setup", "passed"))
    summary.record(report("b[postgres]", "call", "failed"))
    summary.record(report("w", "setup", "skipped", "redis-server not found"))
    assert summary.lines() == [
        "PostgreSQL tests: 3 ran (2 passed, 1 failed), 1 skipped:"
        " redis-server not found (1)",
        "worker tests: 0 ran (0 passed, 0 failed), 1 skipped:"
        " redis-server not found (1)",
    ]


def test_nothing_selected() -> None:
    summary = RunSummary()
    summary.collected([Item("a[sqlite]", callspec=Callspec({"backend": "sqlite"}))])  # type: ignore[list-item]
    assert summary.lines() == [
        "PostgreSQL tests: none selected",
        "worker tests: none selected",
    ]
