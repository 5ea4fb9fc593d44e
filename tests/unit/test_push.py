"""The pusher's decisions: backoff, order, what is kept (integration tests push
between real homeservers, tests/integration/test_push.py)."""

import json
import logging
from urllib.parse import quote

import pytest
from synapse.federation.transport.server._base import _parse_auth_header

from synapse_relay import push as p
from synapse_relay._synapse.outbound import Answer, Denied, Rejected, Unreachable
from synapse_relay.config import RelayConfig
from synapse_relay.store import Entry
from tests.unit.deferreds import run
from tests.unit.test_sender import FakeApi

B = "b.example"
ORIGIN = "origin.example"


def entry(entry_id: int, proven: bool = True, destination: str = B) -> Entry:
    transaction = {
        "origin": ORIGIN,
        "origin_server_ts": 1,
        "destination": destination,
        "transaction_id": f"t/{entry_id}",
        "pdus": [],
        "edus": [],
    }
    proof = {"key": "ed25519:k1", "sig": f"sig{entry_id}"}
    return Entry(
        entry_id, json.dumps(transaction), json.dumps(proof) if proven else None
    )


class FakeStore:
    def __init__(self, *entries: Entry) -> None:
        self.entries = list(entries)

    async def oldest_proven_entry(self, destination: str) -> Entry | None:
        for e in self.entries:
            if e.origin_auth and json.loads(e.txn_json)["destination"] == destination:
                return e
        return None

    async def destinations_with_proven_entries(self) -> list[str]:
        return sorted(
            {
                json.loads(e.txn_json)["destination"]
                for e in self.entries
                if e.origin_auth
            }
        )

    async def acknowledge(self, destination: str, entry_id: int) -> bool:
        before = len(self.entries)
        self.entries = [e for e in self.entries if e.entry_id != entry_id]
        return len(self.entries) < before


class FakeFederation:
    def __init__(self) -> None:
        # outcomes in order; an exception is raised, None/Answer returned
        self.probe_results: list[Exception | None] = []
        self.answers: list[Answer | Exception] = []
        self.calls: list[tuple[str, ...]] = []

    async def probe(
        self, destination: str, *, timeout_ms: int, ignore_backoff: bool
    ) -> None:
        assert ignore_backoff and timeout_ms == p.PROBE_TIMEOUT_MS
        self.calls.append(("probe", destination))
        result = self.probe_results.pop(0) if self.probe_results else None
        if result is not None:
            raise result

    async def replay_send(
        self,
        destination: str,
        path: str,
        body: bytes,
        authorization: str,
        *,
        timeout_ms: int,
    ) -> Answer:
        txn_id = json.loads(body)["transaction_id"]
        assert path == "/_matrix/federation/v1/send/" + quote(txn_id, safe="")
        self.calls.append(("push", txn_id))
        answer = self.answers.pop(0) if self.answers else Answer(200, b"{}")
        if isinstance(answer, Exception):
            raise answer
        return answer


def unreachable() -> Unreachable:
    return Unreachable(RuntimeError("connection refused"))


class Harness:
    def __init__(self, *entries: Entry, max_ms: int = 8_000) -> None:
        self.api = FakeApi()
        self.store = FakeStore(*entries)
        self.federation = FakeFederation()
        self.pusher = p.Pusher(
            RelayConfig(push_interval_max_ms=max_ms),
            self.store,
            self.store.acknowledge,
            self.federation,
            self.api,  # type: ignore[arg-type]
        )

    def delays(self) -> list[float]:
        return [msec for msec, _, _ in self.api.delayed]

    def counters(self) -> dict[str, object]:
        snapshot = self.pusher.stats.snapshot()
        snapshot.pop("destinations")
        return {k: v for k, v in snapshot.items() if v}


def test_outcomes_and_backoff() -> None:
    assert p.outcome_of(200) is p.Outcome.DELIVERED
    for code in (429, 500, 502, 503):
        assert p.outcome_of(code) is p.Outcome.UNREACHABLE
    assert p.outcome_of(401) is p.Outcome.UNAUTHORIZED
    for code in (400, 403, 404, 413):
        assert p.outcome_of(code) is p.Outcome.REJECTED
    delays = [0]
    for _ in range(8):
        delays.append(p.retry_delay_ms(delays[-1], p.Outcome.UNREACHABLE, 60_000))
    assert delays[1:] == [1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000]
    assert p.retry_delay_ms(0, p.Outcome.REJECTED, 60_000) == 60_000
    assert p.retry_delay_ms(0, p.Outcome.UNAUTHORIZED, 500) == 500


def test_header_is_what_synapse_parses() -> None:
    push = p.Push.of(entry(7))
    assert push.txn_id == "t/7" and push.destination == B
    header = push.authorization.encode("ascii")
    assert _parse_auth_header(header) == (ORIGIN, "ed25519:k1", "sig7", B)


def test_probes_back_off_then_pushes_everything_in_order() -> None:
    h = Harness(entry(1), entry(2, proven=False), entry(3), entry(4, destination="c"))
    h.federation.probe_results = [unreachable()] * 5
    h.pusher.wake(B)
    delays = []
    while h.api.delayed:
        delays.extend(h.delays())
        h.api.run_delayed()
    # probes: at once, then after 1, 2, 4, 8 (the cap) and 8 s
    assert delays == [1000, 2000, 4000, 8000, 8000]
    # then B's proven entries, oldest first; the unproven one is left for collection
    assert h.federation.calls == [("probe", B)] * 6 + [("push", "t/1"), ("push", "t/3")]
    assert [e.entry_id for e in h.store.entries] == [2, 4]
    assert h.counters() == {"probes": 6, "attempted": 2, "delivered": 2}
    assert h.pusher.stats.snapshot()["destinations"] == {}


def test_unauthorized_keeps_the_entry_retries_without_probing_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = Harness(entry(1), entry(2))
    h.federation.answers = [Answer(401, b'{"errcode":"M_UNAUTHORIZED"}')] * 3
    with caplog.at_level(logging.INFO):
        h.pusher.wake(B)
        assert h.delays() == [1000]
        state = h.pusher.stats.snapshot()["destinations"]
        assert state == {
            B: {
                "state": "unauthorized",
                "retry_delay_ms": 1000,
                "next_attempt_ts": h.api.now + 1000,
            }
        }
        h.api.run_delayed()
        h.api.run_delayed()
        assert h.delays() == [4000]
        h.api.run_delayed()
    assert h.federation.calls == [("probe", B)] + [("push", "t/1")] * 4 + [
        ("push", "t/2")
    ]
    assert h.store.entries == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "cannot obtain a key of origin.example" in warnings[0].getMessage()
    assert h.counters() == {
        "probes": 1,
        "attempted": 5,
        "unauthorized": 3,
        "delivered": 2,
    }


@pytest.mark.parametrize(
    "failure, outcome, delay, probes_next",
    [
        (Answer(400, b"bad"), "rejected", 8000, False),
        (Answer(403, b"no"), "rejected", 8000, False),
        (Denied(RuntimeError("not whitelisted")), "rejected", 8000, False),
        (Answer(503, b""), "unreachable", 1000, True),
        (Answer(429, b""), "unreachable", 1000, True),
        (unreachable(), "unreachable", 1000, True),
    ],
)
def test_failed_push_keeps_the_entry(
    failure: Answer | Exception, outcome: str, delay: int, probes_next: bool
) -> None:
    h = Harness(entry(1))
    h.federation.answers = [failure]
    h.pusher.wake(B)
    assert h.delays() == [delay]
    assert h.pusher.stats.snapshot()["destinations"][B]["state"] == outcome  # type: ignore[index]
    assert [e.entry_id for e in h.store.entries] == [1]
    h.api.run_delayed()
    assert h.store.entries == []
    expected = [("probe", B), ("push", "t/1")]
    expected += [("probe", B)] if probes_next else []
    assert h.federation.calls == [*expected, ("push", "t/1")]


def test_a_probe_answered_with_an_error_means_up() -> None:
    h = Harness(entry(1))
    h.federation.probe_results = [Rejected(RuntimeError("404"), 404)]
    h.pusher.wake(B)
    assert h.federation.calls == [("probe", B), ("push", "t/1")]


def test_wakes_start_one_run_per_destination() -> None:
    h = Harness(entry(1))
    h.federation.probe_results = [unreachable()]
    h.pusher.wake(B)
    h.pusher.wake(B)  # scheduled already: no second run
    h.pusher.wake(FakeApi.server_name)  # never ourselves
    assert h.federation.calls == [("probe", B)]
    assert len(h.api.delayed) == 1


def test_a_deposit_during_the_last_read_is_pushed_too() -> None:
    h = Harness(entry(1))
    read = h.store.oldest_proven_entry

    async def deposit_while_reading(destination: str) -> Entry | None:
        found = await read(destination)
        if found is None and not h.federation.calls[-1] == ("push", "t/3"):
            # committed just after this read found nothing
            h.store.entries.append(entry(3))
            h.pusher.wake(B)
        return found

    h.store.oldest_proven_entry = deposit_while_reading  # type: ignore[method-assign]
    h.pusher.wake(B)
    pushed = [c[1] for c in h.federation.calls if c[0] == "push"]
    assert pushed == ["t/1", "t/3"]


def test_scan_wakes_destinations_with_proven_entries() -> None:
    h = Harness(entry(1), entry(2, destination="c"), entry(3, False, "d"))
    run(h.pusher.scan())
    assert h.store.entries == [entry(3, False, "d")]
    assert ("probe", "d") not in h.federation.calls


class BackgroundApi(FakeApi):
    def __init__(self, runs_background_tasks: bool) -> None:
        super().__init__()
        self._background = runs_background_tasks
        self.looping: list[tuple[object, int]] = []

    def should_run_background_tasks(self) -> bool:
        return self._background

    def looping_background_call(self, f: object, msec: int, desc: str) -> None:
        self.looping.append((f, msec))


@pytest.mark.parametrize(
    "push, background, started",
    [(True, True, True), (False, True, False), (True, False, False)],
)
def test_only_the_background_tasks_instance_pushes(
    push: bool, background: bool, started: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(p, "OutboundFederation", lambda api: FakeFederation())
    api = BackgroundApi(background)
    store = FakeStore()
    pusher = p.start_pusher(
        RelayConfig(push=push),
        store,  # type: ignore[arg-type]
        store.acknowledge,
        api,  # type: ignore[arg-type]
    )
    assert (pusher is not None) is started
    assert len(api.looping) == int(started)
    if pusher is not None:
        assert api.looping == [(pusher.scan, p.SCAN_INTERVAL_MS)]
