"""Batch collect on a real relay (DESIGN.md section 2b), on SQLite and PostgreSQL.

One relay homeserver per backend holds mail for anyone; alice, bob and eve are
fake federation servers: alice deposits, bob and eve collect their own mail.
"""

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from synapse_relay.loopback import Homeserver
from synapse_relay.protocol import (
    COLLECT_MAX_ACKNOWLEDGE,
    COLLECT_MAX_BYTES,
    COLLECT_MAX_LIMIT,
    MAX_PDUS,
    collect_path,
    send_relay_path,
)
from tests.harness.fedclient import FakeServer

pytestmark = pytest.mark.integration


@dataclass
class Net:
    relay: Homeserver
    alice: FakeServer
    bob: FakeServer
    eve: FakeServer
    admin_token: str


@pytest.fixture(scope="module")
def net(homeserver_factory: Any, fake_servers: Any) -> Iterator[Net]:
    alice, bob, eve = (fake_servers.create() for _ in range(3))
    relay = homeserver_factory.create(
        module_config={"relay": {"enabled": True, "destinations": ["*"]}}
    )
    yield Net(relay, alice, bob, eve, relay.register_user("admin", admin=True))


_counter = iter(range(1_000_000))


def deposit(net: Net, destination: FakeServer, pad: int = 0, pdus: int = 1) -> str:
    """alice deposits a transaction for `destination`; its transaction id."""
    txn_id = f"batch{next(_counter)}-{time.monotonic_ns()}"
    body = {
        "origin_server_ts": 1_700_000_000_000,
        "pdus": [{"type": "m.room.message", "pad": "x" * pad} for _ in range(pdus)],
    }
    response = net.alice.request(
        "PUT", net.relay, send_relay_path(txn_id, destination.server_name), content=body
    )
    assert response.status_code == 200, response.text
    return txn_id


def batch(
    net: Net, owner: FakeServer, body: Any = None, of: FakeServer | None = None
) -> requests.Response:
    """`owner` asks for the batch of `of`'s mail (its own by default)."""
    path = collect_path((of or owner).server_name)
    return owner.request("POST", net.relay, path, content=body)


def collected(response: requests.Response) -> tuple[list[tuple[int, str]], bool]:
    """(entry id, transaction id) of each entry of a 200 answer, and entries_queued."""
    assert response.status_code == 200, response.text
    answer = response.json()
    return [
        (e["entry_id"], e["transaction"]["transaction_id"]) for e in answer["entries"]
    ], answer["entries_queued"]


def drain(net: Net, owner: FakeServer) -> None:
    """Acknowledge everything queued for `owner`."""
    entries, more = collected(batch(net, owner, {"limit": COLLECT_MAX_LIMIT}))
    while entries:
        ids = [entry_id for entry_id, _ in entries]
        entries, more = collected(
            batch(net, owner, {"acknowledge": ids, "limit": COLLECT_MAX_LIMIT})
        )
    assert not more


def queued(net: Net, destination: FakeServer) -> int:
    response = net.relay.client("GET", "/_synapse/relay/v1/queues", net.admin_token)
    assert response.status_code == 200, response.text
    return sum(
        q["transactions"]
        for q in response.json()["queues"]
        if q["destination"] == destination.server_name
    )


def test_batches_in_order_with_acknowledgements(net: Net) -> None:
    drain(net, net.bob)
    txn_ids = [deposit(net, net.bob) for _ in range(5)]
    # default limit 10: all five, nothing more
    entries, more = collected(batch(net, net.bob))
    assert [t for _, t in entries] == txn_ids and not more
    ids = [entry_id for entry_id, _ in entries]
    assert ids == sorted(ids)
    entry = batch(net, net.bob, {"limit": 1}).json()["entries"][0]
    assert entry["transaction"]["origin"] == net.alice.server_name
    assert entry["transaction"]["destination"] == net.bob.server_name
    assert "synapse_relay.origin_auth" not in entry  # an unproven deposit

    # two at a time: entries_queued says whether more remain after these
    entries, more = collected(batch(net, net.bob, {"limit": 2}))
    assert entries == list(zip(ids[:2], txn_ids[:2], strict=True)) and more
    entries, more = collected(batch(net, net.bob, {"acknowledge": ids[:2], "limit": 2}))
    assert [t for _, t in entries] == txn_ids[2:4] and more
    assert queued(net, net.bob) == 3
    # acknowledging twice, or ids that do not exist, is harmless
    entries, more = collected(
        batch(net, net.bob, {"acknowledge": ids[:4] + [2**62], "limit": 2})
    )
    assert [t for _, t in entries] == txn_ids[4:] and not more
    entries, more = collected(batch(net, net.bob, {"acknowledge": ids[4:]}))
    assert entries == [] and not more
    assert queued(net, net.bob) == 0


def test_answer_size_budget(net: Net) -> None:
    drain(net, net.bob)
    # three transactions of about 0.6 MiB: one per answer, the first always
    pad = COLLECT_MAX_BYTES * 6 // 10 // MAX_PDUS
    txn_ids = [deposit(net, net.bob, pad=pad, pdus=MAX_PDUS) for _ in range(3)]
    entries, more = collected(batch(net, net.bob, {"limit": 3}))
    assert [t for _, t in entries] == txn_ids[:1] and more
    small = deposit(net, net.bob)
    entries, more = collected(
        batch(net, net.bob, {"acknowledge": [entries[0][0]], "limit": 3})
    )
    assert [t for _, t in entries] == txn_ids[1:2] and more
    drain(net, net.bob)
    assert small not in txn_ids and queued(net, net.bob) == 0


@pytest.mark.parametrize(
    "body",
    [
        {"limit": 0},
        {"limit": -1},
        {"limit": "x"},
        {"limit": 2.5},
        {"acknowledge": "1"},
        {"acknowledge": [1, "2"]},
        {"acknowledge": list(range(1, COLLECT_MAX_ACKNOWLEDGE + 2))},
    ],
)
def test_bad_input_changes_nothing(net: Net, body: dict) -> None:
    drain(net, net.bob)
    deposit(net, net.bob)
    ((entry_id, _),) = collected(batch(net, net.bob))[0]
    response = batch(net, net.bob, {"acknowledge": [entry_id], **body})
    assert response.status_code == 400, response.text
    assert response.json()["errcode"] == "M_INVALID_PARAM", response.text
    assert queued(net, net.bob) == 1  # not acknowledged


def test_huge_limit_is_served(net: Net) -> None:
    # (clamped to COLLECT_MAX_LIMIT: see tests/unit/test_relay_input.py)
    drain(net, net.bob)
    txn_ids = [deposit(net, net.bob) for _ in range(3)]
    entries, more = collected(batch(net, net.bob, {"limit": 10**9}))
    assert [t for _, t in entries] == txn_ids and not more
    drain(net, net.bob)


def test_only_the_owner_and_only_its_entries(net: Net) -> None:
    drain(net, net.bob)
    drain(net, net.eve)
    deposit(net, net.bob)
    deposit(net, net.eve)
    ((bobs, _),) = collected(batch(net, net.bob))[0]
    ((eves, _),) = collected(batch(net, net.eve))[0]
    # eve cannot collect bob's mail, nor acknowledge it through bob's mailbox
    response = batch(net, net.eve, {"acknowledge": [bobs]}, of=net.bob)
    assert response.status_code == 403, response.text
    assert response.json()["errcode"] == "M_FORBIDDEN"
    # acknowledging bob's entry in her own mailbox deletes nothing of bob's
    entries, _ = collected(batch(net, net.eve, {"acknowledge": [bobs]}))
    assert [entry_id for entry_id, _ in entries] == [eves]
    assert queued(net, net.bob) == 1 and queued(net, net.eve) == 1
    # unsigned: 401
    response = net.bob.request(
        "POST", net.relay, collect_path(net.bob.server_name), content={}, auth=False
    )
    assert response.status_code == 401, response.text
    drain(net, net.bob)
    drain(net, net.eve)
