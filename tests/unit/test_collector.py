"""The receive role's decisions and collection loop, against fakes of Synapse and of
the relays (integration tests run it between real homeservers)."""

from collections.abc import Collection
from typing import Any, cast

import pytest
from twisted.internet import defer

from synapse_relay import collector as c
from synapse_relay import inbound, staging
from synapse_relay import relay_client as rc
from synapse_relay._synapse import HeldKey
from synapse_relay._synapse.inbound import NotaryKeyRejected, RelayRequestFailed
from synapse_relay.config import ReceiveConfig
from tests.harness.fake_relay import Mailbox
from tests.unit.deferreds import run

US = "b.example"
A = "a.example"


def pdu(n: int = 0, sender: str = f"@alice:{A}", ts: int = 1000, **extra: Any) -> dict:
    return {
        "event_id": f"$event{n}",
        "room_id": "!room:a.example",
        "sender": sender,
        "type": "m.room.message",
        "origin_server_ts": ts,
        "signatures": {A: {"ed25519:k1": "sig"}},
        **extra,
    }


def txn(n: int = 0, **fields: Any) -> dict:
    body = {
        "origin": A,
        "destination": US,
        "origin_server_ts": 5,
        "transaction_id": f"t{n}",
        "pdus": [pdu(n)],
        "edus": [],
    }
    body.update(fields)
    return body


def to_device(type_: str = "m.room.encrypted", sender: str = f"@alice:{A}") -> dict:
    return {
        "edu_type": "m.direct_to_device",
        "content": {
            "sender": sender,
            "type": type_,
            "message_id": "m1",
            "messages": {"@bob:b.example": {"DEV": {"ciphertext": "x"}}},
        },
    }


# --- pure decisions -----------------------------------------------------------------


def test_parse_relay_answer() -> None:
    assert inbound.parse_relay_answer({"transaction": {}, "entry_id": 0}) is None
    assert inbound.parse_relay_answer({"entries_queued": False, "entry_id": 0}) is None
    entry = inbound.parse_relay_answer(
        {"transaction": {"a": 1}, "entry_id": 7, "entries_queued": True}
    )
    assert entry == inbound.RelayEntry(7, {"a": 1})
    # Dendrite may flag the last entry as the last one: still an entry
    entry = inbound.parse_relay_answer(
        {"transaction": {"a": 1}, "entry_id": 8, "entries_queued": False}
    )
    assert entry == inbound.RelayEntry(8, {"a": 1})
    bad: Any
    for bad in (
        [],
        {"transaction": {"a": 1}},
        {"transaction": {"a": 1}, "entry_id": 0},
        {"transaction": {"a": 1}, "entry_id": "3"},
        {"transaction": {"a": 1}, "entry_id": True},
    ):
        with pytest.raises(inbound.MalformedAnswer):
            inbound.parse_relay_answer(bad)


def test_prepare_keeps_what_the_origin_signed() -> None:
    body = txn(
        pdus=[pdu(1), pdu(2, sender="@carol:c.example"), pdu(3)],
        edus=[
            to_device(),
            to_device(type_="m.key.verification.request"),
            to_device(sender="@mallory:c.example"),
            {"edu_type": "m.typing", "content": {"room_id": "!r", "typing": True}},
            {"edu_type": "m.device_list_update", "content": {}},
            {"edu_type": "m.receipt", "content": {}},
        ],
        extra="dropped",
    )
    prepared = inbound.prepare_transaction(body, US, now_ms=99)
    assert isinstance(prepared, inbound.Prepared)
    assert prepared.origin == A
    assert prepared.txn_id == "t0" and not prepared.derived_id
    assert prepared.fed_txn_id == "relayed:t0"
    assert [p["event_id"] for p in prepared.body["pdus"]] == ["$event1", "$event3"]
    assert list(prepared.dropped_pdus) == ["$event2"]
    assert prepared.body["edus"] == [to_device()]
    unproven = "unproven, and a relay could forge it"
    assert prepared.dropped_edus == {
        ("m.direct_to_device", "unproven, and not Olm-encrypted"): 1,
        ("m.direct_to_device", "its sender is not a user of the origin"): 1,
        ("m.typing", unproven): 1,
        ("m.device_list_update", unproven): 1,
        ("m.receipt", unproven): 1,
    }
    assert prepared.body["origin_server_ts"] == 5
    assert set(prepared.body) == {
        "origin",
        "origin_server_ts",
        "destination",
        "pdus",
        "edus",
    }


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"destination": "c.example"}, "destined to 'c.example'"),
        ({"origin": None}, "origin None is not a server name"),
        ({"origin": "not a server"}, "is not a server name"),
        ({"origin": US}, "its origin is this server"),
        ({"pdus": {"a": 1}}, "pdus is not a list"),
        ({"edus": [1]}, "edus is not a list"),
        ({"pdus": [pdu(i) for i in range(51)]}, "51 pdus"),
    ],
)
def test_prepare_refuses(fields: dict, reason: str) -> None:
    refusal = inbound.prepare_transaction(txn(**fields), US, now_ms=1)
    assert isinstance(refusal, inbound.Refusal)
    assert reason in refusal.reason


def test_prepare_without_destination_or_id_or_ts() -> None:
    body = txn()
    del body["destination"], body["transaction_id"], body["origin_server_ts"]
    prepared = inbound.prepare_transaction(body, US, now_ms=42)
    assert isinstance(prepared, inbound.Prepared)
    assert prepared.derived_id
    assert prepared.txn_id == inbound.derive_txn_id(body)
    assert prepared.body["origin_server_ts"] == 42
    assert prepared.body["destination"] == US


def test_derived_txn_id_is_stable_and_content_bound() -> None:
    body = txn()
    del body["transaction_id"]
    same = dict(reversed(list(body.items())))
    assert inbound.derive_txn_id(body) == inbound.derive_txn_id(same)
    assert inbound.derive_txn_id(body).startswith("derived-")
    assert len(inbound.derive_txn_id(body)) == len("derived-") + 43
    assert inbound.derive_txn_id(body) != inbound.derive_txn_id({**body, "pdus": []})


def test_keys_needed_and_satisfied() -> None:
    pdus = [
        pdu(1, ts=10),
        pdu(2, ts=30),
        pdu(3, ts=20, signatures={A: {"ed25519:k2": "s"}}),
        pdu(4, signatures={}),
    ]
    needed = inbound.keys_needed(pdus, A)
    assert needed == {"ed25519:k1": 30, "ed25519:k2": 20}
    held = {"ed25519:k1": HeldKey("K1", 30), "ed25519:k2": HeldKey("K2", 25)}
    assert inbound.keys_satisfied(held, needed)
    assert not inbound.keys_satisfied({"ed25519:k1": HeldKey("K1", 29)}, needed)
    assert not inbound.keys_satisfied({"ed25519:k1": HeldKey("K1", 30)}, needed)


def server_keys(key: str = "K1", until: int = 100, old: dict | None = None) -> dict:
    return {
        "server_name": A,
        "valid_until_ts": until,
        "verify_keys": {"ed25519:k1": {"key": key}},
        "old_verify_keys": old or {},
        "signatures": {A: {"ed25519:k1": "s"}, "relay.example": {"ed25519:r": "s"}},
    }


def test_judge_offered_keys() -> None:
    needed = {"ed25519:k1": 50}
    # nothing held: useful
    assert inbound.judge_offered_keys({}, needed, server_keys()) is None
    # the same key, valid for longer: useful (padding does not matter)
    held = {"ed25519:k1": HeldKey("K1=", 10)}
    assert inbound.judge_offered_keys(held, needed, server_keys()) is None
    # another key under the same id: never
    objection = inbound.judge_offered_keys(held, needed, server_keys(key="EVIL"))
    assert objection is not None and "contradicts" in objection
    # an old key contradicting ours: never
    held_old = {"ed25519:k0": HeldKey("K0", 5), **held}
    offered = server_keys(old={"ed25519:k0": {"key": "EVIL", "expired_ts": 5}})
    objection = inbound.judge_offered_keys(held_old, needed, offered)
    assert objection is not None and "ed25519:k0 contradicts" in objection
    # not valid for longer than ours: useless
    held = {"ed25519:k1": HeldKey("K1", 100)}
    assert inbound.judge_offered_keys(held, needed, server_keys()) is not None
    # no needed key at all
    assert inbound.judge_offered_keys({}, {"ed25519:k9": 1}, server_keys()) is not None
    assert inbound.offered_keys(
        server_keys(old={"ed25519:k0": {"key": "K0==", "expired_ts": 7}})
    ) == {"ed25519:k1": ("K1", 100), "ed25519:k0": ("K0", 7)}


def test_judge_feed() -> None:
    busy = inbound.judge_feed(429, {})
    assert busy.verdict is inbound.Verdict.TRANSIENT and not busy.counts_as_attempt
    assert inbound.judge_feed(500, {}).verdict is inbound.Verdict.TRANSIENT
    assert inbound.judge_feed(500, {}).counts_as_attempt
    assert inbound.judge_feed(400, {}).verdict is inbound.Verdict.REJECTED
    ok = inbound.judge_feed(
        200,
        {
            "pdus": {
                "$ok": {},
                "$bad_sig": {"error": "ERROR 403: unable to verify signature for ..."},
                "$acl": {"errcode": "M_FORBIDDEN", "error": "Server is banned"},
            }
        },
    )
    assert ok.verdict is inbound.Verdict.PROCESSED
    assert ok.accepted == ("$ok",)
    assert set(ok.rejected) == {"$bad_sig", "$acl"}
    no_key = inbound.judge_feed(
        200,
        {
            "pdus": {
                "$e": {
                    "error": "ERROR 403: unable to verify signature for sender domain"
                    " a.example: 401: Failed to find any key to satisfy: ..."
                }
            }
        },
    )
    assert no_key.verdict is inbound.Verdict.TRANSIENT and no_key.counts_as_attempt
    database = inbound.judge_feed(
        200, {"pdus": {"$e": {"error": "connection refused"}}}
    )
    assert database.verdict is inbound.Verdict.TRANSIENT
    assert inbound.judge_feed(200, {}).verdict is inbound.Verdict.PROCESSED


def test_retry_txn_id() -> None:
    assert inbound.retry_txn_id("relayed:t1", 5) == "relayed:t1:retry:5"


# --- the collection loop ------------------------------------------------------------


class FakeRelay(Mailbox):
    """A relay's mailbox for us whose next request can fail; with the batch
    endpoint when `batch` is set, else answering it as Dendrite would."""

    fail_next: RelayRequestFailed | None = None
    batch = False

    def answer(self, acknowledged: int) -> dict:
        if self.fail_next is not None:
            self.requests.append(acknowledged)
            error, self.fail_next = self.fail_next, None
            raise error
        return super().answer(acknowledged)

    def batch_answer(self, acknowledge: list[int], limit: int) -> dict:
        if not self.batch:
            raise RelayRequestFailed("r", "answered 404", 404, "M_UNRECOGNIZED")
        if self.fail_next is not None:
            self.batch_requests.append((list(acknowledge), limit))
            error, self.fail_next = self.fail_next, None
            raise error
        return super().batch_answer(acknowledge, limit)


def batch_relay(*transactions: dict) -> FakeRelay:
    relay = FakeRelay(*transactions)
    relay.batch = True
    return relay


class FakeHomeserver:
    """Synapse's side: records what is fed, answers as configured."""

    server_name = US

    def __init__(self, relays: dict[str, FakeRelay]) -> None:
        self.relays = relays
        self.fed: list[tuple[str, str, dict]] = []
        self.answers: list[Any] = []  # next answers of feed (or exceptions)
        self.stored_responses: dict[tuple[str, str], tuple[int, dict]] = {}
        self.staged_polls: list[set[str]] = []
        self.keys: dict[str, HeldKey] = {}
        self.notary: dict[str, Any] = {}  # relay -> list of keys, or an exception
        self.stored_notary_keys: list[tuple[str, dict]] = []
        self.blocker: defer.Deferred[None] | None = None
        self.staged_kicks = 0
        self.verified: list[tuple[str, dict, int]] = []

    async def get_with_body(
        self, destination: str, path: str, content: dict, timeout_ms: int
    ) -> Any:
        assert path == "/_matrix/federation/v1/relay_txn/%40_relay%3Ab.example"
        if self.blocker is not None:
            await self.blocker
        return self.relays[destination].answer(content["entry_id"])

    async def post_json(
        self, destination: str, path: str, content: dict, timeout_ms: int
    ) -> Any:
        assert path == (
            "/_matrix/federation/unstable/synapse_relay/collect/%40_relay%3Ab.example"
        )
        if self.blocker is not None:
            await self.blocker
        return self.relays[destination].batch_answer(
            content["acknowledge"], content["limit"]
        )

    async def query_notary(
        self, notary: str, server_name: str, timeout_ms: int
    ) -> list[dict]:
        answer = self.notary.get(notary, [])
        if isinstance(answer, Exception):
            raise answer
        return list(answer)

    async def held_keys(
        self, server_name: str, key_ids: Collection[str]
    ) -> dict[str, HeldKey]:
        return {k: v for k, v in self.keys.items() if k in key_ids}

    async def store_notary_keys(self, notary: str, keys: dict) -> None:
        if keys.get("bad"):
            raise NotaryKeyRejected("bad signature")
        self.stored_notary_keys.append((notary, keys))
        for key_id, (key, until) in inbound.offered_keys(keys).items():
            self.keys[key_id] = HeldKey(key, until)

    async def verify_signed(
        self, server_name: str, signed: dict, valid_at_ms: int
    ) -> None:
        """Verifies a signature "good" of a key we hold."""
        self.verified.append((server_name, signed, valid_at_ms))
        [(key, sig)] = signed["signatures"][server_name].items()
        if sig != "good" or key not in self.keys:
            raise ValueError("Invalid signature")

    async def previous_response(
        self, origin: str, txn_id: str
    ) -> tuple[int, dict] | None:
        return self.stored_responses.get((origin, txn_id))

    async def feed(
        self, origin: str, txn_id: str, transaction: dict
    ) -> tuple[int, dict]:
        self.fed.append((origin, txn_id, transaction))
        answer: Any
        if self.answers:
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
        else:
            answer = (200, {"pdus": {p["event_id"]: {} for p in transaction["pdus"]}})
        if answer[0] == 200:
            self.stored_responses[(origin, txn_id)] = answer
        return cast(tuple[int, dict], answer)

    async def still_staged(self, origin: str, event_ids: Collection[str]) -> set[str]:
        if self.staged_polls:
            return self.staged_polls.pop(0) & set(event_ids)
        return set()

    async def process_staged(self) -> None:
        self.staged_kicks += 1


class FakeApi:
    def __init__(self) -> None:
        self.now = 1_000
        self.slept: list[float] = []
        self.delayed: list[tuple[int, Any]] = []

    def delayed_background_call(self, msec: int, f: Any, desc: str) -> None:
        self.delayed.append((msec, f))

    def run_delayed(self) -> None:
        """Run the calls delayed so far (not those they delay in turn)."""
        calls, self.delayed = self.delayed, []
        for _, f in calls:
            run(f())

    def should_run_background_tasks(self) -> bool:
        return True

    def run_as_background_process(self, desc: str, f: Any) -> defer.Deferred:
        return defer.ensureDeferred(f())

    def get_current_time_msec(self) -> int:
        self.now += 1
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += int(seconds * 1000)


class FakeStore:
    def __init__(self) -> None:
        self.up = True

    async def ping(self) -> None:
        if not self.up:
            raise ConnectionError("database down")


def make(
    *relays: tuple[str, FakeRelay],
) -> tuple[c.Collector, FakeHomeserver, FakeStore, FakeApi]:
    hs = FakeHomeserver(dict(relays))
    store = FakeStore()
    api = FakeApi()
    collector = c.Collector(
        ReceiveConfig(relays=tuple(name for name, _ in relays)),
        hs,
        api,  # type: ignore[arg-type]
        store,  # type: ignore[arg-type]
    )
    return collector, hs, store, api


def stats(collector: c.Collector, relay: str = "r1") -> dict:
    snapshot = collector.stats.snapshot()
    return snapshot["relays"][relay]  # type: ignore[index,no-any-return]


def test_collects_in_order_and_acknowledges_after_processing() -> None:
    relay = FakeRelay(txn(1), txn(2), txn(3))
    collector, hs, _, _ = make(("r1", relay))
    result = run(collector.collect())
    assert result.to_json() == {
        "processed": 3,
        "rejected": 0,
        "relays": {"r1": {"processed": 3, "rejected": 0, "error": None}},
    }
    assert [txn_id for _, txn_id, _ in hs.fed] == [
        "relayed:t1",
        "relayed:t2",
        "relayed:t3",
    ]
    # each request acknowledges the entry processed before it, the last one too
    assert relay.requests == [0, 1, 2, 3]
    assert relay.entries == {}
    assert stats(collector)["collected"] == 3
    assert stats(collector)["processed"] == 3


def test_several_relays_one_after_the_other() -> None:
    r1, r2 = FakeRelay(txn(1)), FakeRelay(txn(1), txn(2))
    collector, hs, _, _ = make(("r1", r1), ("r2", r2))
    result = run(collector.collect())
    assert result.processed == 3
    assert [txn_id for _, txn_id, _ in hs.fed] == [
        "relayed:t1",
        "relayed:t1",
        "relayed:t2",
    ]


def test_waits_until_synapse_processed_the_pdus() -> None:
    relay = FakeRelay(txn(1))
    collector, hs, _, api = make(("r1", relay))
    hs.staged_polls = [{"$event1"}, {"$event1"}, set()]
    run(collector.collect())
    assert api.slept == [ms / 1000 for ms in staging.PROCESSING_POLL_MS[:2]]
    assert relay.entries == {}


def test_processing_timeout_stops_without_acknowledging() -> None:
    relay = FakeRelay(txn(1))
    collector, hs, _, _ = make(("r1", relay))
    hs.staged_polls = [{"$event1"}] * 1000
    result = run(collector.collect())
    assert result.processed == 0
    assert "has not processed 1 PDUs" in result.relays["r1"].error
    assert relay.requests == [0]
    assert 1 in relay.entries


def test_synapse_is_asked_to_process_its_staging_area_while_pdus_wait() -> None:
    relay = FakeRelay(txn(1))
    collector, hs, _, _ = make(("r1", relay))
    hs.staged_polls = [{"$event1"}] * 30  # about 5 s of waiting
    assert run(collector.collect()).processed == 1
    assert 3 <= hs.staged_kicks <= 5


def test_collects_again_as_soon_as_the_database_answers() -> None:
    relay = FakeRelay(txn(1))
    collector, hs, store, api = make(("r1", relay))
    store.up = False
    hs.answers = [RuntimeError("connection to the database lost")]
    assert run(collector.collect()).processed == 0
    assert [msec for msec, _ in api.delayed] == [c.DATABASE_CHECK_MS]
    api.run_delayed()  # still down: checked again later, nothing collected
    assert len(hs.fed) == 1 and len(api.delayed) == 1
    store.up = True
    api.run_delayed()
    assert relay.entries == {}
    assert api.delayed == []
    assert hs.staged_kicks == 1
    # a failure while the database answers waits for the next poll
    relay.add(txn(2))
    hs.answers = [RuntimeError("an EDU handler failed")]
    assert run(collector.collect()).processed == 0
    assert api.delayed == []


def test_wrong_destination_is_refused_and_acknowledged() -> None:
    relay = FakeRelay(txn(1, destination="c.example"), txn(2))
    collector, hs, _, _ = make(("r1", relay))
    result = run(collector.collect())
    assert (result.processed, result.rejected) == (1, 1)
    assert [txn_id for _, txn_id, _ in hs.fed] == ["relayed:t2"]
    assert relay.requests == [0, 1, 2]
    assert stats(collector)["rejected"] == 1


def test_transient_failure_stops_without_acknowledging_and_retries() -> None:
    relay = FakeRelay(txn(1), txn(2))
    collector, hs, _, _ = make(("r1", relay))
    hs.answers = [(429, {"errcode": "M_UNKNOWN"})]
    result = run(collector.collect())
    assert result.processed == 0
    assert "another transaction of the same origin" in result.relays["r1"].error
    assert relay.requests == [0]
    assert stats(collector)["failures"] == 1
    # next round: the same entry again
    result = run(collector.collect())
    assert result.processed == 2
    assert [txn_id for _, txn_id, _ in hs.fed] == [
        "relayed:t1",
        "relayed:t1",
        "relayed:t2",
    ]


def test_stored_failure_is_retried_under_a_fresh_id() -> None:
    relay = FakeRelay(txn(1))
    collector, hs, _, _ = make(("r1", relay))
    hs.answers = [(200, {"pdus": {"$event1": {"error": "database is down"}}})]
    assert run(collector.collect()).processed == 0
    assert run(collector.collect()).processed == 1
    assert hs.fed[0][1] == "relayed:t1"
    assert hs.fed[1][1].startswith("relayed:t1:retry:")


def test_rejected_for_good_is_acknowledged() -> None:
    relay = FakeRelay(txn(1))
    collector, hs, _, _ = make(("r1", relay))
    hs.answers = [(200, {"pdus": {"$event1": {"error": "ERROR 403: bad signature"}}})]
    result = run(collector.collect())
    assert result.processed == 1
    assert relay.entries == {}
    assert stats(collector)["pdus_rejected"] == 1


def test_synapse_refusing_the_transaction_is_acknowledged() -> None:
    relay = FakeRelay(txn(1))
    collector, hs, _, _ = make(("r1", relay))
    hs.answers = [(400, {})]
    result = run(collector.collect())
    assert (result.processed, result.rejected) == (0, 1)
    assert relay.entries == {}


def test_failing_transaction_is_given_up_only_while_the_database_answers() -> None:
    relay = FakeRelay(txn(1), txn(2))
    collector, hs, store, _ = make(("r1", relay))
    store.up = False
    hs.answers = [RuntimeError("boom")] * 100
    for _ in range(c.GIVE_UP_AFTER_ATTEMPTS + 2):
        assert run(collector.collect()).relays["r1"].error is not None
    assert 1 in relay.entries
    store.up = True
    for _ in range(c.GIVE_UP_AFTER_ATTEMPTS - 1):
        assert run(collector.collect()).relays["r1"].error is not None
    assert 1 in relay.entries
    result = run(collector.collect())
    assert result.rejected == 1
    # t2 fails too (the following answers are exceptions as well)
    assert 1 not in relay.entries and 2 in relay.entries


def test_relay_failure_keeps_the_acknowledgement_for_the_next_round() -> None:
    relay = FakeRelay(txn(1), txn(2))
    collector, hs, _, _ = make(("r1", relay))
    original = relay.answer
    failed: list[bool] = []

    def answer(acknowledged: int) -> dict:
        # the request acknowledging t1 fails, once
        if acknowledged == 1 and not failed:
            failed.append(True)
            relay.fail_next = RelayRequestFailed("r1", "connection refused")
        return original(acknowledged)

    relay.answer = answer  # type: ignore[method-assign]
    result = run(collector.collect())
    assert result.processed == 1
    assert result.relays["r1"].error is not None
    assert 1 in relay.entries
    result = run(collector.collect())
    assert result.processed == 1
    # the acknowledgement is sent again first: t1 is not fed twice
    assert relay.requests == [0, 1, 1, 2]
    assert [txn_id for _, txn_id, _ in hs.fed] == ["relayed:t1", "relayed:t2"]
    assert relay.entries == {}


def test_unreachable_relay_is_a_failure_and_the_next_relay_is_still_asked() -> None:
    r1, r2 = FakeRelay(txn(1)), FakeRelay(txn(2))
    collector, hs, _, _ = make(("r1", r1), ("r2", r2))
    r1.fail_next = RelayRequestFailed("r1", "connection refused")
    result = run(collector.collect())
    assert result.relays["r1"].error == "relay_txn failed: r1: connection refused"
    assert result.relays["r2"].processed == 1
    assert stats(collector, "r1")["failures"] == 1


@pytest.mark.parametrize("batch", [False, True])
def test_relay_that_does_not_delete_is_stopped(batch: bool) -> None:
    relay = FakeRelay(txn(1))
    relay.batch = batch
    relay.forget_acks = True
    collector, hs, _, _ = make(("r1", relay))
    result = run(collector.collect())
    assert result.processed == 1
    assert "handed out entry 1 again" in result.relays["r1"].error


def test_malformed_answer_is_a_failure() -> None:
    relay = FakeRelay({"origin": A})
    collector, hs, _, _ = make(("r1", relay))
    relay.answer = lambda acknowledged: {"transaction": {"a": 1}}  # type: ignore[method-assign]
    result = run(collector.collect())
    assert "entry_id None" in result.relays["r1"].error


def test_collections_join() -> None:
    relay = FakeRelay(txn(1))
    collector, hs, _, _ = make(("r1", relay))
    hs.blocker = defer.Deferred()
    first = defer.ensureDeferred(collector.collect())
    second = defer.ensureDeferred(collector.collect())
    assert not first.called and not second.called
    blocker, hs.blocker = hs.blocker, None
    blocker.callback(None)
    results: list[Any] = []
    first.addCallback(results.append)
    second.addCallback(results.append)
    assert len(results) == 2 and results[0] is results[1]
    assert results[0].processed == 1
    assert relay.requests == [0, 1]
    assert stats(collector)["collections"] == 1


# --- batch collect, fetching ahead --------------------------------------------------


def test_batch_collect_fetches_ahead_and_feeds_in_order() -> None:
    count = rc.BATCH_LIMIT + 5
    relay = batch_relay(*(txn(n) for n in range(1, count + 1)))
    collector, hs, _, _ = make(("r1", relay))
    result = run(collector.collect())
    assert result.processed == count
    assert [txn_id for _, txn_id, _ in hs.fed] == [
        f"relayed:t{n}" for n in range(1, count + 1)
    ]
    assert relay.entries == {} and relay.requests == []  # no relay_txn at all
    assert relay.batch_requests == [
        ([], rc.BATCH_LIMIT),
        # while the last entry in hand is fed, the next batch is asked for,
        # acknowledging only what Synapse processed; the entries fed and not
        # processed yet (24, 25) come back, skipped, and count in the limit
        (list(range(1, rc.BATCH_LIMIT - 1)), rc.BATCH_LIMIT + 2),
        # the last batch said nothing more remains: acknowledging what was
        # processed meanwhile (30 was still in Synapse's staging area)...
        (list(range(rc.BATCH_LIMIT - 1, count)), rc.BATCH_LIMIT + 1),
        # ...and, once Synapse processed it, the last one
        ([count], rc.BATCH_LIMIT),
    ]
    assert relay.acknowledged == list(range(1, count + 1))


class SlowStaging:
    """Synapse processing each staged PDU only after it was checked `polls` times;
    records how many PDUs were staged at each feed."""

    def __init__(self, hs: FakeHomeserver, polls: int) -> None:
        self.remaining: dict[str, int] = {}
        self.staged_at_feed: list[int] = []
        original_feed = hs.feed

        async def feed(origin: str, txn_id: str, transaction: dict) -> Any:
            self.staged_at_feed.append(len(self.remaining))
            for p in transaction["pdus"]:
                self.remaining[p["event_id"]] = polls
            return await original_feed(origin, txn_id, transaction)

        async def still_staged(origin: str, event_ids: Collection[str]) -> set[str]:
            for event_id in event_ids:
                if event_id in self.remaining:
                    self.remaining[event_id] -= 1
                    if self.remaining[event_id] <= 0:
                        del self.remaining[event_id]
            return set(event_ids) & set(self.remaining)

        hs.feed = feed  # type: ignore[method-assign]
        hs.still_staged = still_staged  # type: ignore[method-assign]


def test_feeds_ahead_within_synapse_staging_window() -> None:
    per_txn = 20
    relay = batch_relay(
        *(txn(n, pdus=[pdu(n * 100 + i) for i in range(per_txn)]) for n in range(1, 8))
    )
    collector, hs, _, _ = make(("r1", relay))
    slow = SlowStaging(hs, polls=3)
    assert run(collector.collect()).processed == 7
    assert [txn_id for _, txn_id, _ in hs.fed] == [f"relayed:t{n}" for n in range(1, 8)]
    # the next transaction is fed while earlier ones are still staged...
    assert max(slow.staged_at_feed) > 0
    # ...but never beyond the window
    assert all(n + per_txn <= staging.STAGING_WINDOW for n in slow.staged_at_feed)
    assert relay.entries == {} and slow.remaining == {}


def test_batch_collect_of_an_empty_mailbox_is_one_request() -> None:
    relay = batch_relay()
    collector, hs, _, _ = make(("r1", relay))
    assert run(collector.collect()).processed == 0
    assert relay.batch_requests == [([], rc.BATCH_LIMIT)]


def test_batch_failure_keeps_acknowledgements_for_the_next_round() -> None:
    relay = batch_relay(*(txn(n) for n in range(1, rc.BATCH_LIMIT + 3)))
    collector, hs, _, _ = make(("r1", relay))
    original = relay.batch_answer

    def batch_answer(acknowledge: list[int], limit: int) -> dict:
        if acknowledge:  # the request fetching ahead fails
            relay.fail_next = RelayRequestFailed("r1", "timed out")
        return original(acknowledge, limit)

    relay.batch_answer = batch_answer  # type: ignore[method-assign]
    result = run(collector.collect())
    # the last entry was fed, and not known to be processed when the request
    # failed
    assert result.processed == rc.BATCH_LIMIT - 1
    assert result.relays["r1"].error == "batch collect failed: r1: timed out"
    assert 1 in relay.entries  # nothing acknowledged
    relay.batch_answer = original  # type: ignore[method-assign]
    first_round = len(relay.batch_requests)
    result = run(collector.collect())
    # every processed entry acknowledged first: not fed again...
    assert relay.batch_requests[first_round][0] == list(range(1, rc.BATCH_LIMIT))
    assert result.processed == 3
    # ...but the last one is (Synapse answers it from its stored answer)
    fed = [txn_id for _, txn_id, _ in hs.fed]
    assert fed[rc.BATCH_LIMIT :] == [
        f"relayed:t{n}" for n in range(rc.BATCH_LIMIT, rc.BATCH_LIMIT + 3)
    ]
    assert relay.entries == {}


def test_transient_failure_in_a_batch_acknowledges_only_what_was_processed() -> None:
    relay = batch_relay(txn(1), txn(2), txn(3))
    collector, hs, _, _ = make(("r1", relay))
    hs.answers = [(200, {}), (429, {"errcode": "M_UNKNOWN"})]
    result = run(collector.collect())
    assert result.processed == 1 and result.relays["r1"].error is not None
    assert sorted(relay.entries) == [1, 2, 3]
    assert run(collector.collect()).processed == 2
    assert relay.batch_requests[1] == ([1], rc.BATCH_LIMIT)
    assert relay.entries == {}


def test_relay_without_batch_endpoint_falls_back_and_is_remembered() -> None:
    relay = FakeRelay(txn(1), txn(2))
    collector, hs, _, api = make(("r1", relay))
    assert run(collector.collect()).processed == 2
    assert relay.batch_requests == [] and relay.requests == [0, 1, 2]
    # (FakeRelay records batch requests only when it has the endpoint)
    relay.add(txn(3))
    relay.batch = True
    assert run(collector.collect()).processed == 1
    assert relay.batch_requests == []  # relay_txn until the recheck
    api.now += rc.BATCH_RECHECK_MS
    relay.add(txn(4))
    assert run(collector.collect()).processed == 1
    assert relay.batch_requests == [([], rc.BATCH_LIMIT), ([4], rc.BATCH_LIMIT)]


def test_parse_batch_answer() -> None:
    entries, more = inbound.parse_batch_answer(
        {
            "entries": [
                {"entry_id": 3, "transaction": {"a": 1}},
                {"entry_id": 4, "transaction": {}, "synapse_relay.origin_auth": {}},
            ],
            "entries_queued": True,
        }
    )
    assert more and [(e.entry_id, e.origin_auth) for e in entries] == [
        (3, None),
        (4, {}),
    ]
    for bad in [
        [],
        {"entries": {}},
        {"entries": [], "entries_queued": 1},
        {"entries": [{"entry_id": 0, "transaction": {}}], "entries_queued": False},
        {"entries": [{"entry_id": 1}], "entries_queued": False},
    ]:
        with pytest.raises(inbound.MalformedAnswer):
            inbound.parse_batch_answer(bad)


# --- keys of offline origins --------------------------------------------------------


def test_keys_held_are_not_fetched() -> None:
    relay = FakeRelay(txn(1))
    collector, hs, _, _ = make(("r1", relay))
    hs.keys = {"ed25519:k1": HeldKey("K1", 10_000)}
    hs.notary["r1"] = RelayRequestFailed("r1", "must not be asked")
    assert run(collector.collect()).processed == 1


def test_missing_keys_are_fetched_from_the_relay() -> None:
    relay = FakeRelay(txn(1), txn(2))
    collector, hs, _, _ = make(("r1", relay))
    hs.keys = {"ed25519:k1": HeldKey("K1", 10)}  # expired
    hs.notary["r1"] = [
        {**server_keys(), "server_name": "other.example"},
        server_keys(until=5000),
    ]
    assert run(collector.collect()).processed == 2
    assert hs.stored_notary_keys == [("r1", server_keys(until=5000))]
    assert stats(collector)["keys_fetched"] == 1


def test_contradicting_keys_are_not_stored() -> None:
    relay = FakeRelay(txn(1))
    collector, hs, _, _ = make(("r1", relay))
    hs.keys = {"ed25519:k1": HeldKey("K1", 10)}
    hs.notary["r1"] = [server_keys(key="EVIL", until=5000), {**server_keys(), "bad": 1}]
    # fed anyway: Synapse will try the origin itself
    assert run(collector.collect()).processed == 1
    assert hs.stored_notary_keys == []
    assert hs.keys["ed25519:k1"] == HeldKey("K1", 10)


def test_relay_without_notary_endpoint_is_not_a_failure() -> None:
    relay = FakeRelay(txn(1))
    collector, hs, _, _ = make(("r1", relay))
    hs.notary["r1"] = RelayRequestFailed("r1", "answered 404", code=404)
    assert run(collector.collect()).processed == 1


def test_unreachable_notary_stops_the_collection() -> None:
    relay = FakeRelay(txn(1))
    collector, hs, _, _ = make(("r1", relay))
    hs.notary["r1"] = RelayRequestFailed("r1", "timed out")
    result = run(collector.collect())
    assert result.processed == 0
    assert "fetching the keys of a.example failed" in result.relays["r1"].error
    assert hs.fed == []
    assert 1 in relay.entries


# --- the admin endpoint -------------------------------------------------------------


def test_admin_collect_endpoint() -> None:
    from synapse.module_api.errors import SynapseError

    from synapse_relay.admin import CollectEndpoint

    def error_of(endpoint: CollectEndpoint) -> tuple[int, str]:
        with pytest.raises(SynapseError) as e:
            run(endpoint.on_POST(None))  # type: ignore[arg-type]
        return e.value.code, e.value.msg

    code, message = error_of(CollectEndpoint(None, "main"))
    assert code == 400 and "receive role is not enabled" in message

    relay = FakeRelay(txn(1))
    collector, _, _, _ = make(("r1", relay))
    collector.runs_here = False  # another instance runs background tasks
    code, message = error_of(CollectEndpoint(collector, "background1"))
    assert code == 409 and "'background1' (run_background_tasks_on)" in message
    assert relay.requests == []

    collector.runs_here = True
    assert run(CollectEndpoint(collector, "main").on_POST(None)) == (  # type: ignore[arg-type]
        200,
        {
            "processed": 1,
            "rejected": 0,
            "relays": {"r1": {"processed": 1, "rejected": 0, "error": None}},
        },
    )


# --- origin proof -------------------------------------------------------------------


EDUS = [
    {"edu_type": "m.receipt", "content": {}},
    {"edu_type": "m.device_list_update", "content": {}},
    to_device(type_="m.key.verification.request"),
    {"edu_type": "x.custom", "content": {}},
]
NOW = 10**12


def proven_relay(sig: str = "good", **fields: Any) -> FakeRelay:
    relay = FakeRelay()
    t = txn(1, **{"origin_server_ts": NOW, "edus": EDUS, **fields})
    relay.add(t, {"key": "ed25519:k1", "sig": sig})
    return relay


def test_proven_transaction_is_fed_whole_under_the_origin_id() -> None:
    carols = pdu(2, sender="@carol:c.example")
    relay = proven_relay(pdus=[pdu(1), carols])
    collector, hs, _, api = make(("r1", relay))
    api.now = NOW
    hs.keys["ed25519:k1"] = HeldKey("key", NOW + 1)
    assert run(collector.collect()).processed == 1
    [(origin, txn_id, body)] = hs.fed
    assert (origin, txn_id) == (A, "t1")
    assert body["edus"] == EDUS and body["pdus"] == [pdu(1), carols]
    [(server, signed, valid_at)] = hs.verified
    assert (server, valid_at) == (A, NOW)
    assert signed["uri"] == "/_matrix/federation/v1/send/t1"
    assert set(signed["content"]) == {
        "origin",
        "origin_server_ts",
        "destination",
        "transaction_id",
        "pdus",
        "edus",
    }
    assert stats(collector)["proven"] == 1
    assert collector.stats.snapshot()["edus_by_type"] == {
        "processed": {
            "m.receipt": 1,
            "m.device_list_update": 1,
            "m.direct_to_device": 1,
            "other": 1,
        }
    }


@pytest.mark.parametrize(
    "sig, fields, verified",
    [
        ("forged", {}, True),  # does not verify
        ("good", {"origin_server_ts": NOW + 3_600_000}, False),  # future
        ("good", {"origin_server_ts": 1}, False),  # too old
        ("good", {"extra": 1}, False),  # not T
    ],
)
def test_unverified_proof_is_processed_as_unproven(
    sig: str, fields: dict, verified: bool
) -> None:
    relay = proven_relay(sig, **fields)
    collector, hs, _, api = make(("r1", relay))
    api.now = NOW
    hs.keys["ed25519:k1"] = HeldKey("key", NOW + 1)
    assert run(collector.collect()).processed == 1
    [(_, txn_id, body)] = hs.fed
    assert txn_id == "relayed:t1" and body["edus"] == []
    assert bool(hs.verified) is verified
    assert stats(collector)["proofs_failed"] == 1
    assert stats(collector)["proven"] == 0
    assert collector.stats.snapshot()["edus_by_type"] == {
        "dropped": {
            "m.receipt": 1,
            "m.device_list_update": 1,
            "m.direct_to_device": 1,
            "other": 1,
        }
    }


def test_proof_key_is_fetched_from_the_relay_notary() -> None:
    relay = proven_relay()
    collector, hs, _, api = make(("r1", relay))
    api.now = NOW
    hs.notary["r1"] = [
        {
            "server_name": A,
            "valid_until_ts": NOW + 1,
            "verify_keys": {"ed25519:k1": {"key": "key"}},
        }
    ]
    assert run(collector.collect()).processed == 1
    assert [txn_id for _, txn_id, _ in hs.fed] == ["t1"]
    assert len(hs.stored_notary_keys) == 1
