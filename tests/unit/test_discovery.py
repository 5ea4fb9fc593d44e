"""Relay discovery's decisions (discovery.py): which advertisements are kept, and
how often a destination is asked."""

import json
from typing import Any

import pytest
from signedjson.key import generate_signing_key, get_verify_key
from signedjson.sign import SignatureVerifyException, sign_json, verify_signed_json

from synapse_relay import discovery as d
from synapse_relay._synapse.discovery import BadSignature, NoQueryHandler, QueryFailed
from synapse_relay.config import SendConfig
from synapse_relay.stats import RoleStats
from synapse_relay.store import Advertisement, Discovered
from tests.unit.deferreds import run
from tests.unit.test_sender import FakeApi

B = "b.example"
NOW = 1_000_000_000
KEY = generate_signing_key("k1")
OTHER_KEY = generate_signing_key("k1")


def ad(
    relays: Any = None,
    signer: str = B,
    key: Any = KEY,
    **fields: Any,
) -> dict[str, Any]:
    content: dict[str, Any] = {
        "server_name": B,
        "relays": ["r.example"] if relays is None else relays,
        "ts": NOW - 1000,
        "valid_until_ts": NOW + d.ADVERTISEMENT_VALIDITY_MS,
        **fields,
    }
    signed: dict[str, Any] = sign_json(content, signer, key)
    return signed


def held(ts: int) -> Advertisement:
    return Advertisement(B, ("r.example",), ts, NOW + 10)


def test_a_valid_advertisement_is_kept() -> None:
    found = d.check_advertisement(ad(["r.example", "r2.example:8448"]), B, NOW, None)
    assert found == Advertisement(
        B,
        ("r.example", "r2.example:8448"),
        NOW - 1000,
        NOW + d.ADVERTISEMENT_VALIDITY_MS,
    )
    # the same one again, or a newer one, replaces the one held
    assert d.check_advertisement(ad(), B, NOW, held(NOW - 1000)).ts == NOW - 1000
    assert d.check_advertisement(ad(relays=[]), B, NOW, held(0)).relays == ()


@pytest.mark.parametrize(
    ("answer", "kind", "reason"),
    [
        (["r.example"], d.Refusal.INVALID, "not a JSON object"),
        (ad(padding="x" * 20_000), d.Refusal.INVALID, "bytes, at most"),
        (ad(server_name="c.example"), d.Refusal.INVALID, 'names server "c.example"'),
        (ad(server_name=None), d.Refusal.INVALID, "names server null"),
        (ad(relays={"r.example": 1}), d.Refusal.INVALID, "relays is not a list"),
        (
            ad([f"r{i}.example" for i in range(300)]),
            d.Refusal.INVALID,
            "300 relays, at most 20",
        ),
        (ad(["not a name"]), d.Refusal.INVALID, '"not a name" is not a server name'),
        (ad([7]), d.Refusal.INVALID, "7 is not a server name"),
        (ad(["r.example", "r.example"]), d.Refusal.INVALID, "listed twice"),
        (ad(ts=True), d.Refusal.INVALID, "ts must be an integer"),
        (ad(ts=-1), d.Refusal.INVALID, "ts must be an integer"),
        (ad(valid_until_ts="soon"), d.Refusal.INVALID, "valid_until_ts must be"),
        (ad(ts=NOW + 2 * d.MAX_CLOCK_SKEW_MS), d.Refusal.INVALID, "in the future"),
        (
            {k: v for k, v in ad().items() if k != "signatures"},
            d.Refusal.SIGNATURE,
            "not signed by b.example",
        ),
        (ad(signer="c.example"), d.Refusal.SIGNATURE, "not signed by b.example"),
        (ad(valid_until_ts=NOW), d.Refusal.EXPIRED, "expired"),
    ],
)
def test_bad_advertisements_are_refused(
    answer: Any, kind: d.Refusal, reason: str
) -> None:
    with pytest.raises(d.Refused) as refused:
        d.check_advertisement(answer, B, NOW, None)
    assert refused.value.kind is kind
    assert reason in refused.value.reason


def test_an_older_advertisement_is_refused() -> None:
    with pytest.raises(d.Refused) as refused:
        d.check_advertisement(ad(), B, NOW, held(NOW - 999))
    assert refused.value.kind is d.Refusal.OLDER


def test_the_advertisement_served_is_valid() -> None:
    served = sign_json(d.advertisement_of(("r.example",), B, NOW), B, KEY)
    assert d.check_advertisement(served, B, NOW + 1, None).relays == ("r.example",)


# --- fetching -----------------------------------------------------------------------


class FakeFederation:
    """Answers queries from `answers` (an exception or a JSON answer) and checks
    signatures against b.example's key `KEY`."""

    def __init__(self) -> None:
        self.answers: list[Any] = []
        self.queries: list[str] = []

    async def query(self, destination: str, query_type: str) -> Any:
        assert query_type == "synapse_relay.relays"
        self.queries.append(destination)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def verify_signed_by(
        self, server_name: str, signed: dict, now_ms: int
    ) -> None:
        try:
            verify_signed_json(signed, server_name, get_verify_key(KEY))
        except SignatureVerifyException as e:
            raise BadSignature(str(e)) from e


class FakeStore:
    def __init__(self) -> None:
        self.held: dict[str, Discovered] = {}

    async def discovered_for(self, destination: str) -> Discovered | None:
        return self.held.get(destination)

    async def keep_advertisement(
        self, advertisement: Advertisement, signed_json: str, fetched_ms: int
    ) -> bool:
        json.loads(signed_json)
        old = self.held.get(advertisement.destination)
        if old is not None and old.advertisement.ts > advertisement.ts:
            return False
        self.held[advertisement.destination] = Discovered(advertisement, fetched_ms)
        return True

    async def forget_discovered(self, destination: str) -> bool:
        return self.held.pop(destination, None) is not None


class Setup:
    def __init__(self, interval_ms: int = 60_000, discover: bool = True) -> None:
        api: Any = FakeApi()
        api.now = NOW
        store: Any = FakeStore()
        self.api, self.store = api, store
        self.federation = FakeFederation()
        self.changes = 0
        self.discovery = d.Discovery(
            SendConfig(discover=discover, discover_interval_ms=interval_ms),
            store,
            self.federation,
            api,
            RoleStats("discovery", d.DISCOVERY_COUNTERS, per_relay=False),
            self.changed,
        )

    def changed(self) -> None:
        self.changes += 1

    def fetch(self, answer: Any) -> d.FetchOutcome:
        self.federation.answers.append(answer)
        outcome: d.FetchOutcome = run(self.discovery.fetch(B))
        return outcome

    def counters(self) -> dict[str, object]:
        return {k: v for k, v in self.discovery.stats.snapshot().items() if v}


def test_fetch_keeps_only_what_passes() -> None:
    setup = Setup()
    assert setup.fetch(ad()).result == "kept"
    assert setup.store.held[B].advertisement.relays == ("r.example",)
    assert setup.changes == 1
    forged = ad(["evil.example"], key=OTHER_KEY, ts=NOW)
    outcome = setup.fetch(forged)
    assert outcome.result == "refused"
    assert outcome.reason is not None and outcome.reason.startswith("signature")
    assert setup.fetch(ad(ts=NOW - 5000)).result == "refused"  # older
    assert setup.fetch(NoQueryHandler("404")).result == "no_module"
    assert setup.fetch(QueryFailed("500")).result == "failed"
    assert setup.fetch({"garbage": True}).result == "refused"
    # nothing refused replaced what was kept
    assert setup.store.held[B].advertisement.relays == ("r.example",)
    assert setup.changes == 1
    assert setup.counters() == {
        "fetched": 1,
        "refused_signature": 1,
        "refused_older": 1,
        "refused_invalid": 1,
        "no_module": 1,
        "failed": 1,
    }
    assert setup.fetch(ad(["r2.example"], ts=NOW)).result == "kept"
    assert setup.store.held[B].advertisement.relays == ("r2.example",)


def test_a_destination_is_asked_once_per_interval() -> None:
    setup = Setup(interval_ms=60_000)
    setup.federation.answers = [NoQueryHandler("404")] * 2
    for _ in range(5):
        setup.discovery.delivered(B)
    assert setup.federation.queries == [B]
    setup.api.now += 59_999
    setup.discovery.delivered(B)
    assert setup.federation.queries == [B]
    setup.api.now += 1
    setup.discovery.delivered(B)
    assert setup.federation.queries == [B, B]


def test_a_fresh_copy_held_is_not_fetched_again_after_a_restart() -> None:
    setup = Setup(interval_ms=60_000)
    setup.store.held[B] = Discovered(held(NOW), NOW - 30_000)
    setup.discovery.delivered(B)
    assert setup.federation.queries == []
    setup.api.now += 30_000
    setup.federation.answers = [ad(ts=NOW + 1)]
    setup.discovery.delivered(B)
    assert setup.federation.queries == [B]


def test_nothing_is_fetched_when_discovery_is_off() -> None:
    setup = Setup(discover=False)
    setup.discovery.delivered(B)
    assert setup.federation.queries == []


def test_forget() -> None:
    setup = Setup()
    setup.fetch(ad())
    assert run(setup.discovery.forget(B))
    assert B not in setup.store.held
    assert not run(setup.discovery.forget(B))
