"""Push: a sender-side relay delivers proven entries to a destination that does not
run the module (issue 9 item 4), on SQLite and PostgreSQL.

A (module, send.relays {B: [R]}), R (module, relay for B, push on) and B, a plain
Synapse. The homeservers are shared by the tests of this module, which run in order.
"""

import json
import secrets
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import requests
from signedjson.key import generate_signing_key, write_signing_keys

from synapse_relay.demo import Scenario, User
from synapse_relay.loopback import wait_until
from tests.harness.postgres import Backend

pytestmark = pytest.mark.integration

# R's probes back off up to this: B gets its mail within this (plus processing)
# of answering again.
PUSH_INTERVAL_MAX_S = 3
# A's key validity in the key-expiry test.
SHORT_KEY_VALIDITY = "4s"
TIMEOUT = 60

_FILTER = json.dumps({"room": {"timeline": {"limit": 1000}}})


@pytest.fixture(scope="module")
def scenario(
    backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scenario]:
    """alice@A and bob@B in a room; B runs no module."""
    scenario = Scenario(tmp_path_factory.mktemp(f"push-{backend}"), backend)
    scenario.b.module_config = None
    assert scenario.r.module_config is not None
    scenario.r.module_config["relay"]["push_interval_max"] = f"{PUSH_INTERVAL_MAX_S}s"
    try:
        scenario.start_and_join()
        yield scenario
    finally:
        scenario.stop_all()


def push_counters(scenario: Scenario) -> dict[str, Any]:
    response = scenario.r.client(
        "GET", "/_synapse/relay/v1/status", token=scenario.relay_admin.token
    )
    response.raise_for_status()
    counters: dict[str, Any] = response.json()["push"]
    return counters


class Timeline:
    """A room as bob's client sees it, synced incrementally (a full /sync would
    answer from Synapse's response cache)."""

    def __init__(self, scenario: Scenario) -> None:
        self._scenario = scenario
        self._since = ""
        self.texts: list[str] = []
        # event id -> who read it
        self.readers: dict[str, set[str]] = {}

    def sync(self) -> "Timeline":
        params: dict[str, Any] = {"timeout": 0, "filter": _FILTER}
        if self._since:
            params["since"] = self._since
        sync = self._scenario.bob.call("GET", "/sync", **params)
        self._since = sync["next_batch"]
        rooms = sync.get("rooms", {}).get("join", {})
        room = rooms.get(self._scenario.room_id, {})
        self.texts += [
            e["content"].get("body", "")
            for e in room.get("timeline", {}).get("events", [])
            if e["type"] == "m.room.message"
        ]
        for e in room.get("ephemeral", {}).get("events", []):
            if e["type"] == "m.receipt":
                for event_id, receipts in e["content"].items():
                    read = self.readers.setdefault(event_id, set())
                    read.update(receipts.get("m.read", {}))
        return self

    def has(self, texts: list[str]) -> bool:
        """Whether every one of `texts` arrived, in this order."""
        return [t for t in self.texts if t in texts] == texts


def send_while_b_offline(scenario: Scenario, text: str) -> None:
    """alice sends `text`, deposited on R with its proof."""
    before = scenario.queued_for_b()
    scenario.alice.send_text(scenario.room_id, text)
    wait_until(
        lambda: scenario.queued_for_b() > before, TIMEOUT, message=f"{text!r} on R"
    )


def wait_for_texts(timeline: Timeline, texts: list[str]) -> None:
    wait_until(
        lambda: timeline.sync().has(texts),
        TIMEOUT,
        interval=0.05,
        message=f"bob to receive {texts}",
    )


def test_relay_pushes_messages_and_receipt_to_a_plain_synapse(
    scenario: Scenario,
) -> None:
    a, r, b = scenario.homeservers
    timeline = Timeline(scenario).sync()
    bob_said = scenario.bob.send_text(scenario.room_id, "hello from bob")
    wait_until(
        lambda: "hello from bob" in scenario.alice.texts(scenario.room_id),
        TIMEOUT,
        message="bob's message at A",
    )
    b.stop()
    texts = [f"pushed message {i}" for i in range(3)]
    send_while_b_offline(scenario, texts[0])
    send_while_b_offline(scenario, texts[1])
    scenario.alice.call(
        "POST",
        f"/rooms/{quote(scenario.room_id)}/receipt/m.read/{quote(bob_said)}",
        {},
    )
    # queued after the receipt, so sent in the receipt's transaction or a later one
    send_while_b_offline(scenario, texts[2])
    queued = scenario.queued_for_b()
    a.stop()

    b.start()
    started = time.monotonic()
    wait_for_texts(timeline, texts)
    seconds = time.monotonic() - started
    print(f"\npush delivered {len(texts)} messages {seconds:.2f} s after B started")
    wait_until(
        lambda: scenario.alice.user_id in timeline.sync().readers.get(bob_said, ()),
        TIMEOUT,
        message="alice's read receipt at B",
    )
    assert seconds < PUSH_INTERVAL_MAX_S + 10
    wait_until(lambda: scenario.queued_for_b() == 0, TIMEOUT, message="R drained")
    counters = push_counters(scenario)
    assert counters["delivered"] == queued
    assert counters["unauthorized"] == counters["rejected"] == 0
    assert "ERROR" not in r.log_path.read_text()


def test_push_waits_for_a_key_of_the_origin_valid_now(scenario: Scenario) -> None:
    """B's copy of A's key expires while A is offline: B answers R's pushes 401
    until A is back and B can fetch A's key again; nothing is lost meanwhile."""
    a, r, b = scenario.homeservers
    # A gets a new key, published valid for seconds only, that B fetches now.
    with a.signing_key_path.open("w") as f:
        write_signing_keys(f, [generate_signing_key("a_" + secrets.token_hex(3))])
    a.extra_config = {"key_refresh_interval": SHORT_KEY_VALIDITY}
    if a.is_running:
        a.restart()
    else:
        a.start()
    if not b.is_running:
        b.start()
    timeline = Timeline(scenario)
    scenario.alice.send_text(scenario.room_id, "signed with the new key")
    wait_for_texts(timeline, ["signed with the new key"])
    b.stop()
    texts = [f"message {i} while A's key expires" for i in range(2)]
    for text in texts:
        send_while_b_offline(scenario, text)
    queued = scenario.queued_for_b()
    key_valid_until = key_valid_until_ts(scenario.alice)
    a.stop()
    wait_until(
        lambda: time.time() * 1000 > key_valid_until,
        TIMEOUT,
        message="B's copy of A's key to expire",
    )
    before = push_counters(scenario)

    b.start()
    wait_until(
        lambda: push_counters(scenario)["unauthorized"] > before["unauthorized"],
        TIMEOUT,
        message="R's push answered 401",
    )
    assert scenario.queued_for_b() == queued
    assert "cannot obtain a key of " + a.server_name in r.log_path.read_text()

    a.start()
    wait_for_texts(timeline, texts)
    wait_until(lambda: scenario.queued_for_b() == 0, TIMEOUT, message="R drained")
    assert push_counters(scenario)["delivered"] == before["delivered"] + queued


def key_valid_until_ts(user: User) -> int:
    """Until when the keys A publishes now are valid (B's copy expires before)."""
    response = requests.get(
        f"{user.homeserver.base_url}/_matrix/key/v2/server", verify=False, timeout=10
    )
    response.raise_for_status()
    valid_until: int = response.json()["valid_until_ts"]
    return valid_until
