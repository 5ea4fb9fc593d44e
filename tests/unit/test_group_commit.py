"""Group commit: who waits for which batch, and what each caller gets."""

from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from synapse_relay.group_commit import GroupCommit


class Api:
    """What GroupCommit needs of the module API."""

    def run_as_background_process(
        self, desc: str, func: Any, bg_start_span: bool = True
    ) -> "defer.Deferred[Any]":
        return defer.ensureDeferred(func())


class Database:
    """A commit function whose commits the test finishes one by one."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.pending: list[defer.Deferred[None]] = []

    async def commit(self, items: Sequence[int]) -> list[int | Exception]:
        self.batches.append(list(items))
        done: defer.Deferred[None] = defer.Deferred()
        self.pending.append(done)
        await done
        if -1 in items:
            raise RuntimeError("database down")
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]

    def finish_next(self) -> None:
        self.pending.pop(0).callback(None)


def submit(group: GroupCommit[int, int], item: int) -> list[Any]:
    result: list[Any] = []
    defer.ensureDeferred(group.submit(item)).addBoth(result.append)
    return result


def test_callers_arriving_during_a_commit_share_the_next_one() -> None:
    db = Database()
    group = GroupCommit(Api(), "test", db.commit, max_batch=3)  # type: ignore[arg-type]
    first = submit(group, 2)
    later = [submit(group, i) for i in (4, 5, 6, 8)]
    assert db.batches == [[2]]  # alone: waits for nothing
    db.finish_next()
    assert first == [20]
    assert db.batches == [[2], [4, 5, 6]]  # at most max_batch
    db.finish_next()
    assert db.batches == [[2], [4, 5, 6], [8]]
    db.finish_next()
    assert later[0] == [40] and later[2] == [60] and later[3] == [80]
    (refused,) = later[1]  # an error of one item fails that item alone
    assert isinstance(refused, Failure) and refused.type is ValueError
    # idle again: the next caller starts a commit at once
    assert submit(group, 10) == [] and db.batches[-1] == [10]
    db.finish_next()


def test_a_failed_commit_fails_its_batch_only() -> None:
    db = Database()
    group = GroupCommit(Api(), "test", db.commit, max_batch=10)  # type: ignore[arg-type]
    first = submit(group, 0)
    failing = [submit(group, i) for i in (-1, 2)]
    db.finish_next()
    after = submit(group, 4)
    db.finish_next()
    for result in failing:
        (failure,) = result
        assert isinstance(failure, Failure) and failure.type is RuntimeError
    db.finish_next()
    assert first == [0] and after == [40]
