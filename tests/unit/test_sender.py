"""The send role's decisions, against fakes of Synapse's federation client and of the
relays (integration tests run it between real homeservers)."""

from collections.abc import Callable, Coroutine
from types import SimpleNamespace
from typing import Any

import pytest
from synapse.module_api.errors import SynapseError
from synapse.util.retryutils import NotRetryingDestination
from twisted.internet import defer
from twisted.python.failure import Failure

from synapse_relay import sender as s
from synapse_relay._synapse import outbound
from synapse_relay._synapse.outbound import (
    BackedOff,
    DeliveryError,
    OutgoingTransaction,
    Rejected,
    Unreachable,
)
from synapse_relay.admin import parse_relays
from synapse_relay.config import SendConfig
from synapse_relay.directory import (
    MAPPING_CACHE_MS,
    RelayDirectory,
    Source,
    choose_relays,
    usable_relays,
)
from synapse_relay.early_deposit import DEPOSIT_AFTER_MS
from synapse_relay.protocol import ORIGIN_AUTH, send_relay_path
from synapse_relay.reach import (
    RELAY_RETRY_BASE_MS,
    Destinations,
    DestinationState,
    Reach,
    RelayHealth,
    relay_retry_delay_ms,
)
from synapse_relay.store import Advertisement, Discovered
from tests.unit.deferreds import run

US = "a.example"
B = "b.example"
R1 = "r1.example"
R2 = "r2.example"


def unreachable(code: int | None = None) -> Unreachable:
    return Unreachable(RuntimeError(f"unreachable {code}"), code)


def rejected(code: int) -> Rejected:
    return Rejected(RuntimeError(f"answered {code}"), code)


def backed_off() -> BackedOff:
    return BackedOff(RuntimeError("backing off"))


class FakeApi:
    server_name = US

    def __init__(self) -> None:
        self.now = 1_000_000
        self.sleeps: list[float] = []
        self.delayed: list[tuple[float, Callable[..., Any], tuple[Any, ...]]] = []

    def get_current_time_msec(self) -> int:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += int(seconds * 1000)

    def delayed_background_call(
        self, msec: float, f: Callable[..., Any], *args: Any, desc: str = ""
    ) -> "FakeDelayedCall":
        call = (msec, f, args)
        self.delayed.append(call)
        return FakeDelayedCall(self, call)

    def run_as_background_process(
        self, desc: str, f: Callable[..., Any], *args: Any
    ) -> "defer.Deferred[Any]":
        async def wrapped() -> Any:
            try:
                return await f(*args)
            except Exception:
                return None

        return defer.ensureDeferred(wrapped())

    def run_delayed(self) -> None:
        """Run the delayed calls due so far (advancing time to the last one)."""
        delayed, self.delayed = self.delayed, []
        for msec, f, args in delayed:
            self.now += int(msec)
            result = f(*args)
            if isinstance(result, Coroutine):
                run(result)


class FakeDelayedCall:
    def __init__(self, api: FakeApi, call: tuple) -> None:
        self._api, self._call = api, call

    def active(self) -> bool:
        return any(c is self._call for c in self._api.delayed)

    def cancel(self) -> None:
        self._api.delayed = [c for c in self._api.delayed if c is not self._call]


class FakeFederation:
    def __init__(self) -> None:
        # what each direct attempt does, in order: an exception, or a response
        # (a Deferred: the attempt waits for it, then does what it fires with)
        self.direct: list[Any] = []
        self.direct_calls: list[tuple[str, bool]] = []
        # relay -> an exception, None (accepted), or a Deferred to wait for
        self.relays: dict[str, Any] = {}
        self.deposits: list[tuple[str, str, dict]] = []
        self.signed: list[dict] = []
        self.probe_result: Exception | None = None
        self.probe_results: list[Exception | None] = []  # before probe_result
        self.probes: list[str] = []
        self.probe_backoff: list[bool] = []
        self.woken: list[str] = []

    async def send_transaction(
        self, txn: OutgoingTransaction, *, timeout_ms: int, ignore_backoff: bool
    ) -> dict:
        assert timeout_ms == s.DIRECT_TIMEOUT_MS
        self.direct_calls.append((txn.transaction_id, ignore_backoff))
        outcome = self.direct.pop(0)
        if isinstance(outcome, defer.Deferred):
            outcome = await outcome
        if isinstance(outcome, Exception):
            raise outcome
        assert isinstance(outcome, dict)
        return outcome

    def sign(self, request: dict) -> tuple[str, str]:
        self.signed.append(request)
        return "ed25519:k", "sig"

    async def deposit(self, relay: str, path: str, body: dict, *, timeout_ms: int):
        self.deposits.append((relay, path, body))
        outcome = self.relays.get(relay)
        if isinstance(outcome, defer.Deferred):
            outcome = await outcome
        if isinstance(outcome, Exception):
            raise outcome

    async def probe(
        self, destination: str, *, timeout_ms: int, ignore_backoff: bool
    ) -> None:
        assert timeout_ms == s.PROBE_TIMEOUT_MS
        self.probes.append(destination)
        self.probe_backoff.append(ignore_backoff)
        result = self.probe_results.pop(0) if self.probe_results else self.probe_result
        if result is not None:
            raise result

    def wake_destination(self, destination: str) -> None:
        self.woken.append(destination)

    async def failure_for_synapse(self, destination: str, reason: str) -> Exception:
        return RuntimeError(f"for synapse: {reason}")


class FakeStore:
    def __init__(self, admin: dict[str, tuple[str, ...]] | None = None) -> None:
        self.admin = admin or {}
        self.discovered_relays: dict[str, Discovered] = {}
        self.reads = 0
        self.fail = False

    async def send_relays(self) -> dict[str, tuple[str, ...]]:
        self.reads += 1
        if self.fail:
            raise RuntimeError("database down")
        return dict(self.admin)

    async def send_relays_for(self, destination: str) -> tuple[str, ...] | None:
        return self.admin.get(destination)

    async def discovered(self) -> dict[str, Discovered]:
        return dict(self.discovered_relays)

    async def discovered_for(self, destination: str) -> Discovered | None:
        return self.discovered_relays.get(destination)


class Net:
    def __init__(
        self, relays: dict[str, tuple[str, ...]] | None = None, attempts: int = 3
    ) -> None:
        self.config = SendConfig(
            relays={B: (R1, R2)} if relays is None else relays,
            attempts_before_relay=attempts,
        )
        api: Any = FakeApi()
        store: Any = FakeStore()
        self.api = api
        self.federation = FakeFederation()
        self.store = store
        self.directory = RelayDirectory(
            self.config, self.store, self.api.get_current_time_msec, US
        )
        self.sender = s.Sender(self.config, self.directory, self.federation, self.api)
        self.stock_calls = 0
        self.next_id = 1

    def txn(self, destination: str = B) -> OutgoingTransaction:
        txn_id = str(self.next_id)
        self.next_id += 1
        return OutgoingTransaction(
            destination=destination,
            transaction_id=txn_id,
            pdu_count=1,
            edu_count=0,
            body=lambda: {"origin": US, "origin_server_ts": 5, "pdus": [{"n": txn_id}]},
        )

    def send(self, txn: OutgoingTransaction | None = None) -> Any:
        async def stock() -> dict:
            self.stock_calls += 1
            return {"pdus": {"stock": {}}}

        return run(self.sender.send(txn or self.txn(), stock))

    def stats(self) -> dict:
        return self.sender.stats.snapshot()

    def state(self, destination: str = B) -> DestinationState:
        return self.sender.destinations.get(destination)


# --- pure decisions -----------------------------------------------------------------


def test_delays() -> None:
    delays = [s.retry_delay_ms(n) for n in range(1, 7)]
    assert delays == [100, 200, 400, 800, 1600, 2000]
    assert [relay_retry_delay_ms(n) for n in (1, 2, 3, 5, 6, 100)] == [
        1000,
        2000,
        4000,
        16000,
        30000,
        30000,
    ]


def test_destination_states() -> None:
    d = Destinations()
    assert not d.is_down(B) and d.peek(B) is None
    assert d.mark_down(B, 10) and not d.mark_down(B, 20)
    assert d.is_down(B) and d.get(B).since_ms == 10
    assert d.mark_up(B, 30) and not d.mark_up(B, 40)
    assert d.get(B).since_ms == 30
    d.mark_rejected(B, 50)
    assert d.get(B).rejected and d.get(B).reach is Reach.UP
    d.mark_down(B, 60)
    assert not d.get(B).rejected
    assert d.snapshot()[B] == {
        "state": "down",
        "since_ts": 60,
        "direct_failures": 0,
        "fallbacks": 0,
    }
    d.forget(B)
    assert d.peek(B) is None


def test_relay_health() -> None:
    h = RelayHealth()
    assert h.usable(R1, 0) and h.next_usable_ms([R1, R2], 5) == 5
    assert h.failed(R1, 0) == 1000
    assert not h.usable(R1, 999) and h.usable(R1, 1000)
    assert h.failed(R1, 1000) == 2000
    assert h.next_usable_ms([R1], 1500) == 3000
    assert h.next_usable_ms([R1, R2], 1500) == 1500  # R2 never failed
    h.succeeded(R1)
    assert h.usable(R1, 1001)


def test_usable_relays() -> None:
    assert usable_relays(B, [R1, B, US, R1, R2], US) == (R1, R2)


def test_parse_relays() -> None:
    assert parse_relays({"relays": [R1, "r2.example:8448"]}, B, US) == (
        R1,
        "r2.example:8448",
    )
    assert parse_relays({"relays": []}, B, US) == ()
    body: Any
    for body, message in [
        ({}, "Expected"),
        ({"relays": R1}, "Expected"),
        ({"relays": [R1, 3]}, "relays[1]: 3 is not a server name"),
        ({"relays": ["not a name"]}, "is not a server name"),
        ({"relays": [B]}, "the destination itself"),
        ({"relays": [US]}, "this server"),
        ({"relays": [R1, R1]}, "listed twice"),
        ({"relays": [f"r{i}.example" for i in range(21)]}, "Too many relays"),
    ]:
        with pytest.raises(SynapseError) as e:
            parse_relays(body, B, US)
        assert e.value.code == 400
        assert message in e.value.msg


# --- which relays -------------------------------------------------------------------


def test_directory_admin_overrides_config_and_is_cached() -> None:
    net = Net(relays={B: (R1,), "c.example": (R1,)})
    net.store.admin = {B: (R2,), "c.example": ()}
    assert run(net.directory.relays_for(B)) == (R2,)
    assert run(net.directory.relays_for("c.example")) == ()  # admin: no relays
    assert run(net.directory.relays_for("d.example")) == ()
    assert net.store.reads == 1
    # a change elsewhere is seen once the cache expires...
    net.store.admin = {}
    net.api.now += MAPPING_CACHE_MS - 1
    assert run(net.directory.relays_for(B)) == (R2,)
    net.api.now += 1
    assert run(net.directory.relays_for(B)) == (R1,)
    assert net.store.reads == 2
    # ...and one made here at once
    net.store.admin = {B: (R2, R1)}
    net.sender.mapping_changed(B)
    assert run(net.directory.relays_for(B)) == (R2, R1)
    assert net.store.reads == 3


def discovered(destination: str, *relays: str, until: int = 10**15) -> Discovered:
    return Discovered(Advertisement(destination, relays, 1, until), 1)


def test_directory_uses_discovered_relays_last() -> None:
    net = Net(relays={"c.example": (R1,)})
    net.store.discovered_relays = {
        B: discovered(B, R2, US, B),
        "c.example": discovered("c.example", R2),
        "d.example": discovered("d.example", R2),
        "e.example": discovered("e.example", R2, until=net.api.now),
    }
    net.store.admin = {"d.example": (R1,)}
    found = run(net.directory.resolve(B))
    # a discovered relay naming this server or the destination is ignored
    assert (found.relays, found.source) == ((R2,), Source.DISCOVERED)
    assert run(net.directory.resolve("c.example")).source is Source.CONFIG
    assert run(net.directory.resolve("d.example")).source is Source.ADMIN
    expired = run(net.directory.resolve("e.example"))
    assert (expired.relays, expired.source) == ((), Source.NONE)
    assert expired.discovered is not None
    listed = run(net.directory.everything())
    assert [f.destination for f in listed] == [B, "c.example", "d.example", "e.example"]


def test_a_read_begun_before_an_invalidation_is_not_cached() -> None:
    net = Net(relays={})
    net.store.discovered_relays = {B: discovered(B, R1)}
    assert run(net.directory.relays_for(B)) == (R1,)
    net.api.now += MAPPING_CACHE_MS  # the cache expired: the next call reloads
    pending: defer.Deferred[dict[str, Discovered]] = defer.Deferred()
    old = dict(net.store.discovered_relays)
    net.store.discovered = lambda: pending
    in_flight = defer.ensureDeferred(net.directory.relays_for(B))
    # meanwhile discovery stores b's new relays and invalidates the directory
    del net.store.discovered
    net.store.discovered_relays = {B: discovered(B, R2)}
    net.directory.invalidate()
    pending.callback(old)
    assert in_flight.result == (R1,)
    assert run(net.directory.relays_for(B)) == (R2,)


def test_discovered_relays_are_not_used_when_discovery_is_off() -> None:
    config = SendConfig(discover=False)
    found = choose_relays(B, config, None, discovered(B, R1), 0, US)
    assert (found.relays, found.source) == ((), Source.NONE)


def test_fallback_to_discovered_relays_is_counted() -> None:
    net = Net(relays={})
    net.store.discovered_relays = {B: discovered(B, R1)}
    net.federation.direct = [unreachable()] * 3
    assert net.send() == {"pdus": {}}
    assert net.stats()["fallbacks_discovered"] == 1
    assert net.stats()["fallbacks"] == 1


def test_every_direct_delivery_is_reported() -> None:
    net = Net(relays={B: (R1,)})
    delivered: list[str] = []
    net.sender = s.Sender(
        net.config, net.directory, net.federation, net.api, delivered.append
    )
    net.federation.direct = [{"pdus": {}}, unreachable(), unreachable(), unreachable()]
    net.send()  # B, directly
    net.send(net.txn("c.example"))  # no relays: Synapse's own send
    net.send()  # B down: relayed, not reported
    assert delivered == [B, "c.example"]


def test_directory_survives_a_database_failure() -> None:
    net = Net(relays={B: (R1,)})
    net.store.fail = True
    assert run(net.directory.relays_for(B)) == (R1,)  # the config
    net.store.fail = False
    net.store.admin = {B: (R2,)}
    assert run(net.directory.relays_for(B)) == (R2,)
    net.store.fail = True
    net.api.now += MAPPING_CACHE_MS
    assert run(net.directory.relays_for(B)) == (R2,)  # what was read before


# --- sending ------------------------------------------------------------------------


def test_destination_without_relays_is_left_to_synapse() -> None:
    net = Net()
    assert net.send(net.txn("c.example")) == {"pdus": {"stock": {}}}
    assert net.stock_calls == 1
    assert net.federation.direct_calls == [] and net.federation.deposits == []
    assert run(net.sender.lets_through("c.example")) is False
    assert net.sender.destinations.peek("c.example") is None


def test_direct_success() -> None:
    net = Net()
    net.federation.direct = [{"pdus": {"$e": {}}}]
    assert net.send() == {"pdus": {"$e": {}}}
    assert net.federation.direct_calls == [("1", False)]
    assert net.federation.deposits == [] and net.stock_calls == 0
    assert net.state().reach is Reach.UP


def test_transient_failure_then_success() -> None:
    net = Net()
    net.federation.direct = [unreachable(), {"pdus": {}}]
    assert net.send() == {"pdus": {}}
    assert net.federation.direct_calls == [("1", False), ("1", True)]
    assert net.api.sleeps == [0.1]
    assert net.federation.deposits == []
    assert net.stats()["direct_failures"] == 1
    assert net.state().reach is Reach.UP


def test_down_after_attempts_then_deposit_on_every_relay() -> None:
    net = Net()
    net.federation.direct = [unreachable(), unreachable(503), unreachable(429)]
    txn = net.txn()
    assert net.send(txn) == {"pdus": {}}
    # the first attempt respects and feeds Synapse's backoff, the others do not
    assert net.federation.direct_calls == [("1", False), ("1", True), ("1", True)]
    assert net.api.sleeps == [0.1, 0.2]
    transaction = {
        "origin": US,
        "origin_server_ts": 5,
        "destination": B,
        "transaction_id": "1",
        "pdus": [{"n": "1"}],
        "edus": [],
    }
    body = {**transaction, ORIGIN_AUTH: {"key": "ed25519:k", "sig": "sig"}}
    path = send_relay_path("1", B)
    assert net.federation.deposits == [(R1, path, body), (R2, path, body)]
    # signed once for both relays, as a direct PUT /send of T would be
    assert net.federation.signed == [
        {
            "method": "PUT",
            "uri": "/_matrix/federation/v1/send/1",
            "origin": US,
            "destination": B,
            "content": transaction,
        }
    ]
    assert net.state().reach is Reach.DOWN
    stats = net.stats()
    assert stats["direct_failures"] == 3
    assert stats["fallbacks"] == 1
    assert stats["deposits_accepted"] == 2
    assert stats["relays"] == {
        R1: {"deposits_accepted": 1, "deposits_refused": 0, "deposits_failed": 0},
        R2: {"deposits_accepted": 1, "deposits_refused": 0, "deposits_failed": 0},
    }
    assert stats["destinations"][B]["state"] == "down"
    # a probe is scheduled
    [(msec, _, args)] = net.api.delayed
    assert msec == s.PROBE_INTERVAL_MS and args == (B,)

    # later transactions skip straight to the relays
    net.federation.deposits.clear()
    assert net.send() == {"pdus": {}}
    assert len(net.federation.direct_calls) == 3
    assert [relay for relay, _, _ in net.federation.deposits] == [R1, R2]
    assert net.api.sleeps == [0.1, 0.2]
    assert len(net.api.delayed) == 1  # still one probe
    assert net.stats()["fallbacks"] == 2


def test_one_attempt_before_relay() -> None:
    net = Net(attempts=1)
    net.federation.direct = [unreachable()]
    assert net.send() == {"pdus": {}}
    assert net.api.sleeps == []
    assert len(net.federation.deposits) == 2


@pytest.mark.parametrize("code", [400, 401, 403, 404])
def test_an_answer_from_the_destination_is_never_relayed(code: int) -> None:
    net = Net()
    error = rejected(code)
    net.federation.direct = [error]
    with pytest.raises(RuntimeError) as e:
        net.send()
    assert e.value is error.original  # Synapse gets its own exception back
    assert net.federation.deposits == [] and len(net.federation.direct_calls) == 1
    assert net.state().reach is Reach.UP and net.state().rejected
    assert net.stats()["direct_rejected"] == 1
    assert net.stats()["fallbacks"] == 0
    # and Synapse's backoff of it applies as without this module
    assert run(net.sender.lets_through(B)) is False


def test_synapse_backoff_of_an_unknown_destination_is_tried_at_once() -> None:
    # after a restart: Synapse backs off from B, which answers again
    net = Net()
    net.federation.direct = [backed_off(), {"pdus": {}}]
    assert net.send() == {"pdus": {}}
    assert net.federation.direct_calls == [("1", False), ("1", True)]
    assert net.state().reach is Reach.UP
    assert net.federation.deposits == []


def test_synapse_backoff_of_an_unknown_destination_still_down() -> None:
    net = Net()
    net.federation.direct = [backed_off()] + [unreachable()] * 3
    assert net.send() == {"pdus": {}}
    assert net.federation.direct_calls == [("1", False)] + [("1", True)] * 3
    assert net.state().reach is Reach.DOWN
    assert len(net.federation.deposits) == 2


def test_synapse_backoff_of_a_destination_known_down_is_respected() -> None:
    net = Net()
    net.sender.destinations.mark_down(B, 0)
    net.federation.direct = [backed_off()]
    with pytest.raises(BackedOff):
        run(net.sender._attempt(net.txn(), first=True))
    assert net.federation.direct_calls == [("1", False)]


def test_synapse_backoff_of_a_destination_that_answered_is_ignored() -> None:
    net = Net()
    net.sender.destinations.mark_up(B, 0)
    net.federation.direct = [backed_off(), {"pdus": {}}]
    assert net.send() == {"pdus": {}}
    assert net.federation.direct_calls == [("1", False), ("1", True)]
    assert net.federation.deposits == []


def test_all_relays_fail_then_synapse_keeps_the_transaction() -> None:
    net = Net()
    last = unreachable()
    net.federation.direct = [unreachable(), unreachable(), last]
    net.federation.relays = {R1: unreachable(), R2: unreachable(507)}
    with pytest.raises(RuntimeError) as e:
        net.send()
    assert e.value is last.original  # what Synapse's own send would raise
    stats = net.stats()
    assert stats["fallbacks_failed"] == 1
    assert stats["relays"][R1]["deposits_failed"] == 1
    assert stats["relays"][R2]["deposits_refused"] == 1
    assert stats["deposits_accepted"] == 0
    # the queue is woken when the first relay may be tried again
    wakes = [(msec, args) for msec, f, args in net.api.delayed if args == (B,)]
    assert (RELAY_RETRY_BASE_MS + 1, (B,)) in wakes
    # meanwhile the relays are not tried, and Synapse's backoff applies
    assert run(net.sender.lets_through(B)) is False
    with pytest.raises(RuntimeError, match="for synapse: b.example is down"):
        net.send()
    assert len(net.federation.deposits) == 2
    # once a relay may be tried again, Synapse is let through to it
    net.api.now += RELAY_RETRY_BASE_MS
    assert run(net.sender.lets_through(B)) is True
    net.federation.relays = {}
    assert net.send() == {"pdus": {}}
    assert net.stats()["deposits_accepted"] == 2


def test_wake_reaches_synapse() -> None:
    net = Net(attempts=1)
    net.federation.direct = [unreachable()]
    net.federation.relays = {R1: unreachable(), R2: unreachable()}
    with pytest.raises(RuntimeError):
        net.send()
    net.federation.probe_result = unreachable()
    net.api.run_delayed()
    assert net.federation.woken == [B]
    assert net.federation.probes == [B]


def test_a_slow_relay_does_not_hold_up_the_others() -> None:
    net = Net(attempts=1)
    net.federation.direct = [unreachable()]
    slow: defer.Deferred[Any] = defer.Deferred()
    net.federation.relays = {R1: slow}
    assert net.send() == {"pdus": {}}  # R2 accepted; R1 still pending
    assert net.stats()["relays"][R2]["deposits_accepted"] == 1
    assert R1 not in net.stats()["relays"]
    slow.callback(unreachable())
    assert net.stats()["relays"][R1]["deposits_failed"] == 1
    assert not net.sender.relay_health.usable(R1, net.api.now)
    # the next transaction goes to R2 only, until R1's retry delay is over
    net.federation.relays = {}
    net.federation.deposits.clear()
    assert net.send() == {"pdus": {}}
    assert [relay for relay, _, _ in net.federation.deposits] == [R2]


def test_relay_failure_not_from_federation_is_counted() -> None:
    net = Net(relays={B: (R1,)}, attempts=1)
    net.federation.direct = [unreachable()]
    net.federation.relays = {R1: ValueError("bug")}
    with pytest.raises(RuntimeError):
        net.send()
    assert net.stats()["relays"][R1]["deposits_failed"] == 1


# --- silent destinations: deposits once the direct attempts had no answer in time ---


def send_async(net: Net) -> "defer.Deferred[Any]":
    """Start sending a transaction whose direct attempts may wait."""

    async def stock() -> dict:
        raise AssertionError("not for Synapse")

    return defer.ensureDeferred(net.sender.send(net.txn(), stock))


def deadline_passes(net: Net) -> None:
    """Time passes until the direct attempts have been silent for DEPOSIT_AFTER_MS."""
    due = [c for c in net.api.delayed if c[0] == DEPOSIT_AFTER_MS]
    assert len(due) == 1, net.api.delayed
    net.api.delayed.remove(due[0])
    net.api.now += DEPOSIT_AFTER_MS
    msec, f, args = due[0]
    f(*args)


def result_of(d: "defer.Deferred[Any]") -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "still waiting"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def test_a_silent_destination_gets_it_deposited_after_the_deadline() -> None:
    net = Net()
    silent: list[defer.Deferred[Any]] = [defer.Deferred() for _ in range(3)]
    net.federation.direct = [silent[0]]
    sent = send_async(net)
    assert not sent.called and net.federation.deposits == []
    deadline_passes(net)
    # deposited on both relays; Synapse is told it was sent
    assert result_of(sent) == {"pdus": {}}
    assert [relay for relay, _, _ in net.federation.deposits] == [R1, R2]
    stats = net.stats()
    assert stats["early_deposits"] == 1 and stats["fallbacks"] == 1
    # a silent first attempt does not make the destination down...
    assert net.state().reach is Reach.UNKNOWN
    assert net.federation.direct_calls == [("1", False)]
    # while they go on unanswered, the next transaction is deposited at once and
    # tried directly all the same
    net.federation.direct = [defer.Deferred()]
    assert result_of(send_async(net)) == {"pdus": {}}
    assert len(net.federation.deposits) == 4
    assert net.federation.direct_calls == [("1", False), ("2", False)]
    assert net.stats()["early_deposits"] == 2
    assert all(msec != DEPOSIT_AFTER_MS for msec, _, _ in net.api.delayed)
    # ...the attempts go on in the background, and their failures do
    net.federation.direct = silent[1:]
    silent[0].callback(unreachable())
    silent[1].callback(unreachable())
    silent[2].callback(unreachable())
    assert len(net.federation.direct_calls) == 4
    assert net.state().reach is Reach.DOWN and not net.state().silent
    assert net.stats()["direct_failures"] == 3
    assert len(net.federation.deposits) == 4  # not deposited again


def test_a_slow_but_alive_destination_gets_it_directly_only() -> None:
    net = Net()
    slow: defer.Deferred[Any] = defer.Deferred()
    net.federation.direct = [slow]
    sent = send_async(net)
    assert not sent.called
    net.api.now += DEPOSIT_AFTER_MS - 1
    slow.callback({"pdus": {"$e": {}}})
    assert result_of(sent) == {"pdus": {"$e": {}}}
    assert net.federation.deposits == []
    assert net.api.delayed == []  # the deadline was cancelled
    assert net.state().reach is Reach.UP
    assert net.stats()["early_deposits"] == 0


def slow_past_the_deadline(
    net: Net,
) -> tuple["defer.Deferred[Any]", "defer.Deferred[Any]", "defer.Deferred[Any]"]:
    """A transaction whose direct attempt and deposits are still under way after
    the deadline: (the sending, the direct attempt, the relays' answer)."""
    slow_direct: defer.Deferred[Any] = defer.Deferred()
    slow_relay: defer.Deferred[Any] = defer.Deferred()
    net.federation.direct = [slow_direct]
    net.federation.relays = {R1: slow_relay, R2: slow_relay}
    sent = send_async(net)
    deadline_passes(net)
    return sent, slow_direct, slow_relay


def test_an_answer_after_the_deadline_while_relays_are_slow_decides() -> None:
    net = Net()
    sent, slow_direct, slow_relay = slow_past_the_deadline(net)
    assert not sent.called and len(net.federation.deposits) == 2
    slow_direct.callback({"pdus": {"$e": {}}})
    assert result_of(sent) == {"pdus": {"$e": {}}}
    assert net.state().reach is Reach.UP
    slow_relay.callback(None)  # the deposits end later: a harmless duplicate
    assert net.stats()["deposits_accepted"] == 2


def test_a_rejection_after_the_deadline_goes_back_to_synapse() -> None:
    net = Net()
    sent, slow_direct, _ = slow_past_the_deadline(net)
    error = rejected(403)
    slow_direct.callback(error)
    with pytest.raises(RuntimeError) as e:
        result_of(sent)
    assert e.value is error.original
    assert net.state().rejected


def test_relays_refusing_after_the_deadline_leave_it_to_the_direct_attempts() -> None:
    net = Net()
    silent: list[defer.Deferred[Any]] = [defer.Deferred() for _ in range(3)]
    net.federation.direct = list(silent)
    net.federation.relays = {R1: unreachable(), R2: unreachable(507)}
    sent = send_async(net)
    deadline_passes(net)
    assert not sent.called  # no relay took it: the direct attempts may still
    for d in silent[:2]:
        d.callback(unreachable())
    assert not sent.called
    last = unreachable()
    silent[2].callback(last)
    with pytest.raises(RuntimeError) as e:
        result_of(sent)
    assert e.value is last.original
    assert net.stats()["fallbacks_failed"] == 1
    assert net.state().reach is Reach.DOWN


def test_a_destination_refusing_connections_is_relayed_before_the_deadline() -> None:
    net = Net()
    net.federation.direct = [unreachable()] * 3
    assert net.send() == {"pdus": {}}
    assert net.stats()["early_deposits"] == 0
    assert all(msec != DEPOSIT_AFTER_MS for msec, _, _ in net.api.delayed)


# --- recovery -----------------------------------------------------------------------


def down(net: Net) -> None:
    net.federation.direct = [unreachable()] * net.config.attempts_before_relay
    assert net.send() == {"pdus": {}}
    assert net.state().reach is Reach.DOWN


def test_probe_until_it_answers() -> None:
    net = Net()
    down(net)
    net.federation.probe_result = unreachable()
    net.api.run_delayed()
    assert net.federation.probes == [B]
    assert net.federation.probe_backoff == [False]
    assert net.state().reach is Reach.DOWN
    [(msec, _, _)] = net.api.delayed  # the next probe, one interval later
    assert msec == s.PROBE_INTERVAL_MS
    net.federation.probe_result = None
    net.api.run_delayed()
    assert net.state().reach is Reach.UP
    assert net.federation.woken == [B]
    assert net.api.delayed == []
    assert net.stats()["probes"] == 2 and net.stats()["recoveries"] == 1
    # direct delivery resumes
    net.federation.deposits.clear()
    net.federation.direct = [{"pdus": {}}]
    assert net.send() == {"pdus": {}}
    assert net.federation.deposits == []


def test_probe_feeds_synapse_backoff_unless_it_is_backing_off() -> None:
    net = Net()
    down(net)
    net.federation.probe_results = [unreachable()]
    net.api.run_delayed()
    assert net.federation.probe_backoff == [False]  # fed Synapse's backoff
    net.federation.probe_results = [backed_off(), None]
    net.api.run_delayed()
    assert net.federation.probe_backoff == [False, False, True]
    assert net.state().reach is Reach.UP


def test_probe_answered_with_an_error_is_an_answer() -> None:
    net = Net()
    down(net)
    net.federation.probe_result = rejected(404)
    net.api.run_delayed()
    assert net.state().reach is Reach.UP


def test_probe_stops_when_the_destination_has_no_relays_any_more() -> None:
    net = Net()
    down(net)
    net.store.admin = {B: ()}
    net.sender.mapping_changed(B)
    net.api.run_delayed()
    assert net.federation.probes == []
    assert net.sender.destinations.peek(B) is None


def test_synapse_reporting_it_up_resumes_direct_delivery() -> None:
    net = Net()
    down(net)
    net.sender.remote_server_up(B)
    assert net.state().reach is Reach.UP
    assert net.stats()["recoveries"] == 1
    net.sender.remote_server_up("unrelated.example")
    assert net.sender.destinations.peek("unrelated.example") is None
    # the pending probe finds it up and does nothing
    net.api.run_delayed()
    assert net.federation.probes == []
    net.federation.direct = [{"pdus": {}}]
    net.federation.deposits.clear()
    assert net.send() == {"pdus": {}}
    assert net.federation.deposits == []


def test_remote_server_up_clears_a_rejection() -> None:
    net = Net()
    net.federation.direct = [rejected(403)]
    with pytest.raises(RuntimeError):
        net.send()
    assert run(net.sender.lets_through(B)) is False
    net.sender.remote_server_up(B)
    assert run(net.sender.lets_through(B)) is True


def test_delivery_errors_keep_synapse_exception() -> None:
    original = RuntimeError("x")
    error: DeliveryError = Unreachable(original, 502)
    assert error.original is original and error.code == 502


# --- the backoff interceptions in _synapse/outbound.py ---------------------------


class FakeTimings:
    def __init__(self, retry_last_ts: int, retry_interval: int) -> None:
        self.failure_ts = retry_last_ts
        self.retry_last_ts = retry_last_ts
        self.retry_interval = retry_interval


class FakeSynapseStore:
    """What synapse.util.retryutils reads from Synapse's datastore."""

    def __init__(self, timings: dict[str, FakeTimings]) -> None:
        self.timings = timings
        federation = SimpleNamespace(
            destination_min_retry_interval_ms=600_000,
            destination_retry_multiplier=2,
            destination_max_retry_interval_ms=7 * 24 * 3600_000,
        )
        self.hs = SimpleNamespace(config=SimpleNamespace(federation=federation))

    async def get_destination_retry_timings(self, destination: str) -> Any:
        return self.timings.get(destination)

    async def get_destination_retry_timings_batch(self, destinations: Any) -> Any:
        return {d: self.timings.get(d) for d in destinations}


@pytest.fixture
def bypass(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Destinations the send role lets through Synapse's backoff."""
    through: set[str] = set()

    async def lets_through(destination: str) -> bool:
        return destination in through

    monkeypatch.setattr(outbound, "_backoff_bypasses", [lets_through])
    return through


def test_one_hour_filter_lets_relayed_destinations_through(bypass: set[str]) -> None:
    now = 10_000_000
    clock = SimpleNamespace(time_msec=lambda: now)
    hour = 3600_000
    store = FakeSynapseStore(
        {
            "up.example": FakeTimings(0, 0),
            "soon.example": FakeTimings(now, hour // 2),
            "late.example": FakeTimings(now, 2 * hour),
            "relayed.example": FakeTimings(now, 2 * hour),
        }
    )
    destinations = ["up.example", "soon.example", "late.example", "relayed.example"]
    bypass.add("relayed.example")
    kept = run(
        outbound._filter_destinations_by_retry_limiter(destinations, clock, store, hour)
    )
    assert sorted(kept) == ["relayed.example", "soon.example", "up.example"]


def test_retry_limiter_lets_relayed_destinations_through(bypass: set[str]) -> None:
    now = 10_000_000
    store = FakeSynapseStore({B: FakeTimings(now, 600_000)})
    kwargs: dict[str, Any] = {
        "our_server_name": US,
        "hs": None,
        "clock": SimpleNamespace(time_msec=lambda: now),
        "store": store,
    }
    with pytest.raises(NotRetryingDestination):
        run(outbound._get_retry_limiter(destination=B, **kwargs))
    bypass.add(B)
    assert run(outbound._get_retry_limiter(destination=B, **kwargs)) is not None
