"""Running coroutines in unit tests, where every awaitable completes at once."""

from collections.abc import Coroutine
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine whose awaitables all complete at once; its result."""
    results: list[Any] = []
    defer.ensureDeferred(coro).addBoth(results.append)
    assert results, "the coroutine is still waiting"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]
