"""Origin proof (DESIGN.md 2b, issue 9) between real homeservers and real E2EE
clients (matrix-nio, tests/harness/client.py).

Each backend (SQLite, PostgreSQL) gets three homeservers with the module:

- `a`: alice's server; its send role deposits what it sends to `b` on `r` when `b`
  is down (`send.relays: {b: [r]}`), with its origin proof;
- `r`: the relay, holding mail for anyone;
- `b`: bob's server, collecting from `r` at start-up and on the admin `collect`.

alice and bob (nio clients with E2EE, one device each) share an encrypted room,
set up while every server is up. Presence is off everywhere.
"""

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nio import ReceiptEvent

from synapse_relay.compression import compress
from synapse_relay.store import stored_txn_json
from tests.harness.client import Client
from tests.harness.fedclient import quote
from tests.harness.homeserver import Homeserver, HomeserverFactory, run_sql, wait_until

pytestmark = pytest.mark.integration

QUIET = {"presence": {"enabled": False}}
DEADLINE = 60


@dataclass
class Net:
    a: Homeserver
    r: Homeserver
    b: Homeserver
    alice: Client
    bob: Client
    room_id: str
    r_admin: str
    b_admin: str


@pytest.fixture(scope="module")
def net(
    homeserver_factory: HomeserverFactory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Net]:
    # Push off: these tests show what b's collector does with proven entries (R's
    # push would race it to deliver them; tests/integration/test_push.py covers it).
    r = homeserver_factory.create(
        {"relay": {"enabled": True, "destinations": ["*"], "push": False}}, QUIET
    )
    b = homeserver_factory.create(
        {"receive": {"relays": [r.server_name], "poll_interval": "1h"}}, QUIET
    )
    a = homeserver_factory.create(
        {"send": {"relays": {b.server_name: [r.server_name]}}}, QUIET
    )
    a.register_user("alice")
    b.register_user("bob")
    stores: Path = tmp_path_factory.mktemp("clients")
    with (
        Client(a, "alice", stores / "alice") as alice,
        Client(b, "bob", stores / "bob") as bob,
    ):
        room_id = alice.create_room(encrypted=True, invite=[bob.user_id])
        bob.sync_until(lambda: room_id in bob.nio.invited_rooms, DEADLINE, "invite")
        bob.join(room_id)
        alice.sync_until(
            lambda: bob.user_id in alice.nio.rooms[room_id].users, DEADLINE, "join"
        )
        # alice's device gets an Olm session with bob's and shares a room key,
        # and each server learns the other's device lists, while both are up
        alice.send_text(room_id, "hello")
        bob.sync_until(lambda: "hello" in bob.texts(room_id), DEADLINE, "hello")
        yield Net(
            a=a,
            r=r,
            b=b,
            alice=alice,
            bob=bob,
            room_id=room_id,
            r_admin=r.register_user("admin", admin=True),
            b_admin=b.register_user("admin", admin=True),
        )


# --- helpers ------------------------------------------------------------------------


def ok(response: Any) -> Any:
    assert response.status_code == 200, f"{response.status_code} {response.text}"
    return response.json()


def start(*servers: Homeserver) -> None:
    for server in servers:
        if not server.is_running:
            server.start()


def entries_for(net: Net, destination: str) -> list[tuple[int, dict, str | None]]:
    """(entry id, transaction, proof) of every entry `r` holds for `destination`."""
    rows = run_sql(
        net.r,
        "SELECT entry_id, txn_json, txn_compressed, origin_auth"
        " FROM synapse_relay_entries WHERE destination = ? ORDER BY entry_id",
        (destination,),
    )
    return [
        (entry_id, json.loads(stored_txn_json(text, compressed)), proof)
        for entry_id, text, compressed, proof in rows
    ]


def edu_kinds(transaction: dict) -> list[str]:
    """Each EDU's type, with the message type for to-device messages."""
    return [
        edu["edu_type"]
        + (
            f"/{edu['content']['type']}"
            if edu["edu_type"] == "m.direct_to_device"
            else ""
        )
        for edu in transaction["edus"]
    ]


def wait_for_deposits(net: Net, kinds: set[str]) -> list[tuple[int, dict, str | None]]:
    """Wait until `r` holds EDUs of every kind in `kinds` for b; the entries."""

    def deposited() -> list[tuple[int, dict, str | None]]:
        entries = entries_for(net, net.b.server_name)
        held = {kind for _, t, _ in entries for kind in edu_kinds(t)}
        return entries if kinds <= held else []

    return wait_until(deposited, DEADLINE, interval=0.1, message=f"{kinds} on r")


def receive_status(net: Net) -> dict:
    status = ok(net.b.client("GET", "/_synapse/relay/v1/status", net.b_admin))
    return status["receive"]  # type: ignore[no-any-return]


def read_receipts(client: Client, room_id: str) -> set[tuple[str, str]]:
    """(user, event id) of every read receipt the client saw in the room."""
    return {
        (receipt.user_id, receipt.event_id)
        for event in client.ephemeral.get(room_id, [])
        if isinstance(event, ReceiptEvent)
        for receipt in event.receipts
        if receipt.receipt_type == "m.read"
    }


def send_to_device(net: Net, event_type: str, content: dict) -> None:
    path = "/_matrix/client/v3/sendToDevice/{}/{}".format(
        quote(event_type), quote(f"t{time.monotonic_ns()}")
    )
    messages = {net.bob.user_id: {net.bob.device_id: content}}
    ok(net.a.client("PUT", path, net.alice.nio.access_token, {"messages": messages}))


def bob_says(net: Net, body: str) -> str:
    """bob sends a message (both servers up); its event id, once alice has it."""
    event_id = net.bob.send_text(net.room_id, body)
    net.alice.sync_until(
        lambda: body in net.alice.texts(net.room_id), DEADLINE, repr(body)
    )
    return event_id


def read_receipt(net: Net, event_id: str) -> None:
    room = quote(net.room_id)
    path = f"/_matrix/client/v3/rooms/{room}/receipt/m.read/{quote(event_id)}"
    ok(net.a.client("POST", path, net.alice.nio.access_token, {}))


# --- tests --------------------------------------------------------------------------


# (in this order: the first leaves a and b up, the second ends with a down)


def test_a_relay_altering_a_proven_transaction(net: Net) -> None:
    start(net.a, net.r, net.b)
    room_id = net.room_id
    net.b.stop()
    # alice reads her own message: a receipt on an event b will have
    before = net.alice.send_text(room_id, "before the altered one")
    read_receipt(net, before)
    entries = wait_for_deposits(net, {"m.receipt"})
    [(entry_id, transaction, proof)] = [
        e for e in entries if "m.receipt" in edu_kinds(e[1])
    ]
    assert proof is not None
    net.alice.send_text(room_id, "after the altered one")
    wait_until(
        lambda: entries_for(net, net.b.server_name)[-1][0] > entry_id,
        DEADLINE,
        message="the message deposited after it",
    )
    # r alters one byte of the receipt's transaction: its timestamp's last digit
    [(text, compressed)] = run_sql(
        net.r,
        "SELECT txn_json, txn_compressed FROM synapse_relay_entries WHERE entry_id = ?",
        (entry_id,),
    )
    text = stored_txn_json(text, compressed)
    ts = str(transaction["origin_server_ts"])
    field = f'"origin_server_ts":{ts}'
    altered = text.replace(field, field[:-1] + str((int(ts[-1]) + 1) % 10), 1)
    assert len(altered) == len(text) and altered != text
    run_sql(
        net.r,
        "UPDATE synapse_relay_entries SET txn_json = '', txn_compressed = ?"
        " WHERE entry_id = ?",
        (compress(altered), entry_id),
    )
    net.b.start()
    net.bob.sync_until(
        lambda: "after the altered one" in net.bob.texts(room_id),
        DEADLINE,
        "the message after the altered transaction",
    )
    wait_until(
        lambda: not entries_for(net, net.b.server_name), DEADLINE, message="acked"
    )
    status = receive_status(net)
    counters = status["relays"][net.r.server_name]
    assert counters["proofs_failed"] == 1
    assert status["edus_by_type"]["dropped"]["m.receipt"] == 1
    net.bob.sync()
    assert (net.alice.user_id, before) not in read_receipts(net.bob, room_id)


def test_every_edu_crosses_the_relay_with_a_proof(net: Net) -> None:
    start(net.a, net.r, net.b)
    room_id = net.room_id
    hi = bob_says(net, "hi alice")
    net.b.stop()

    # while b is down: a read receipt, a new device of alice's, to-device
    # messages in clear and encrypted (a new room key), encrypted messages
    read_receipt(net, hi)
    net.a.login("alice")
    send_to_device(net, "org.example.test", {"n": 1})
    net.alice.rotate_room_key(room_id)
    bodies = [f"after rotation {i}" for i in range(3)]
    for body in bodies:
        net.alice.send_text(room_id, body)
    wait_for_deposits(
        net,
        {
            "m.receipt",
            "m.device_list_update",
            "m.direct_to_device/org.example.test",
            "m.direct_to_device/m.room.encrypted",
        },
    )
    # the messages' PDUs too, before a goes
    wait_until(
        lambda: (
            sum(len(t["pdus"]) for _, t, _ in entries_for(net, net.b.server_name))
            >= len(bodies)
        ),
        DEADLINE,
        message="messages deposited",
    )
    entries = entries_for(net, net.b.server_name)
    assert all(proof is not None for _, _, proof in entries), entries
    queue = ok(net.r.client("GET", "/_synapse/relay/v1/queues", net.r_admin))
    [mine] = [q for q in queue["queues"] if q["destination"] == net.b.server_name]
    assert mine["proven"] == mine["transactions"] == len(entries)
    sent = Counter(edu["edu_type"] for _, t, _ in entries for edu in t["edus"])

    # a goes offline, b comes back and collects at start-up
    net.a.stop()
    net.b.start()
    bob = net.bob
    bob.sync_until(
        lambda: set(bodies) <= set(bob.texts(room_id)), DEADLINE, "the messages"
    )
    assert not bob.undecrypted(room_id), "bob could not decrypt every message"
    bob.sync_until(
        lambda: (net.alice.user_id, hi) in read_receipts(bob, room_id),
        DEADLINE,
        "alice's read receipt",
    )
    assert any(
        getattr(e, "type", None) == "org.example.test"
        and e.source["content"] == {"n": 1}
        for e in bob.to_device
    ), bob.to_device
    bob.sync_until(
        lambda: net.alice.user_id in bob.device_lists_changed,
        DEADLINE,
        "alice's device list change",
    )
    wait_until(
        lambda: not entries_for(net, net.b.server_name), DEADLINE, message="acked"
    )
    status = receive_status(net)
    delivered = status["edus_by_type"]["processed"]
    print(f"EDUs deposited by type: {dict(sent)}; processed by b: {delivered}")
    assert delivered == dict(sent)
    assert "dropped" not in status["edus_by_type"]
    assert status["relays"][net.r.server_name]["proven"] == len(entries)
