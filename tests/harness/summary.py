"""The closing lines of a test run: how many PostgreSQL and worker tests ran or
were skipped, and why (hooked in by tests/conftest.py), so that a run without
PostgreSQL or Redis cannot pass for a complete one."""

from collections import Counter
from collections.abc import Callable

import pytest


def runs_on_postgres(item: pytest.Item) -> bool:
    """A test of the PostgreSQL backend (`backend` fixture) or that needs the
    PostgreSQL server some other way (`pg_cluster`)."""
    callspec = getattr(item, "callspec", None)
    on_backend = callspec is not None and callspec.params.get("backend") == "postgres"
    return on_backend or "pg_cluster" in getattr(item, "fixturenames", ())


def runs_workers(item: pytest.Item) -> bool:
    return item.get_closest_marker("workers") is not None


KINDS: dict[str, Callable[[pytest.Item], bool]] = {
    "PostgreSQL": runs_on_postgres,
    "worker": runs_workers,
}


class RunSummary:
    def __init__(self) -> None:
        self._kinds: dict[str, list[str]] = {}  # test id -> its kinds
        self._outcomes: dict[str, str] = {}  # test id -> passed/failed/skipped
        self._skipped_because: dict[str, str] = {}

    def collected(self, items: list[pytest.Item]) -> None:
        for item in items:
            kinds = [kind for kind, test in KINDS.items() if test(item)]
            if kinds:
                self._kinds[item.nodeid] = kinds

    def record(self, report: pytest.TestReport) -> None:
        if report.nodeid not in self._kinds:
            return
        if report.skipped:
            self._outcomes[report.nodeid] = "skipped"
            self._skipped_because[report.nodeid] = _reason(report)
        elif report.failed:
            self._outcomes[report.nodeid] = "failed"
        elif report.when == "call":
            self._outcomes.setdefault(report.nodeid, "passed")

    def lines(self) -> list[str]:
        return [self._line(kind) for kind in KINDS]

    def _line(self, kind: str) -> str:
        tests = [test for test, kinds in self._kinds.items() if kind in kinds]
        if not tests:
            return f"{kind} tests: none selected"
        outcomes = Counter(self._outcomes.get(test, "not run") for test in tests)
        ran = outcomes["passed"] + outcomes["failed"]
        line = (
            f"{kind} tests: {ran} ran ({outcomes['passed']} passed,"
            f" {outcomes['failed']} failed), {outcomes['skipped']} skipped"
        )
        reasons = Counter(
            self._skipped_because[test]
            for test in tests
            if self._outcomes.get(test) == "skipped"
        )
        if reasons:
            line += ": " + "; ".join(
                f"{reason} ({n})" for reason, n in reasons.most_common()
            )
        if outcomes["not run"]:
            line += f"; {outcomes['not run']} not run"
        return line


def _reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # (file, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)
