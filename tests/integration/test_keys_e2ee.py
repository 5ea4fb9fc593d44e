"""Issue 11: end-to-end encryption with real clients while a server is offline.

alice (A) and bob (B) share an encrypted room; R is a relay of both. B goes
offline; alice logs in on a new device and sends 3 messages from it (its Olm
session with bob's device starts from a one-time key of bob's that B escrowed on
R); A goes offline; B comes back and collects: bob decrypts all 3 and lists
alice's new device, learned from A's keys on R while A is offline.
"""

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nio import (
    AsyncClient,
    AsyncClientConfig,
    MegolmEvent,
    RoomMessageText,
    RoomSendResponse,
    SyncResponse,
)

from synapse_relay.loopback import wait_until
from synapse_relay.protocol import keys_path
from tests.harness.fedclient import FakeServer, FakeServerFactory, quote
from tests.harness.homeserver import Homeserver, HomeserverFactory

pytestmark = pytest.mark.integration

TIMEOUT = 60
ENCRYPTION = {
    "type": "m.room.encryption",
    "state_key": "",
    "content": {"algorithm": "m.megolm.v1.aes-sha2"},
}


class Device:
    """One matrix-nio E2EE client (one device), driven synchronously."""

    def __init__(self, homeserver: Homeserver, localpart: str, store: Path) -> None:
        store.mkdir(parents=True, exist_ok=True)
        self.homeserver = homeserver
        self.loop = asyncio.new_event_loop()
        self.client = AsyncClient(
            homeserver.base_url,
            homeserver.user_id(localpart),
            store_path=str(store),
            config=AsyncClientConfig(encryption_enabled=True, store_sync_tokens=True),
            ssl=False,
        )
        self.run(self.client.login("password"))
        assert self.client.device_id, "login failed"
        self.texts: list[str] = []
        self.undecrypted = 0
        self.sync()

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    @property
    def device_id(self) -> str:
        return str(self.client.device_id)

    def sync(self) -> None:
        """One sync, then what a client does after it: upload and query keys."""
        client = self.client
        response = self.run(client.sync(timeout=0))
        assert isinstance(response, SyncResponse), response
        for room in response.rooms.join.values():
            for event in room.timeline.events:
                if isinstance(event, RoomMessageText):
                    self.texts.append(event.body)
                elif isinstance(event, MegolmEvent):
                    self.undecrypted += 1
        if client.should_upload_keys:
            self.run(client.keys_upload())
        if client.should_query_keys:
            self.run(client.keys_query())

    def send(self, room_id: str, text: str) -> None:
        response = self.run(
            self.client.room_send(
                room_id,
                "m.room.message",
                {"msgtype": "m.text", "body": text},
                ignore_unverified_devices=True,
            )
        )
        assert isinstance(response, RoomSendResponse), response

    def devices_of(self, user_id: str) -> set[str]:
        return {d.id for d in self.client.device_store.active_user_devices(user_id)}

    def close(self) -> None:
        self.run(self.client.close())
        self.loop.close()


@pytest.fixture(scope="module")
def servers(
    homeserver_factory: HomeserverFactory,
) -> Iterator[tuple[Homeserver, Homeserver, Homeserver]]:
    r = homeserver_factory.create({"relay": {"enabled": True, "destinations": ["*"]}})
    a = homeserver_factory.create(None)
    b = homeserver_factory.create(None)
    for me, other in ((a, b), (b, a)):
        me.module_config = {
            "send": {"relays": {other.server_name: [r.server_name]}},
            "receive": {
                "relays": [r.server_name],
                "poll_interval": "500ms",
                "key_upload_interval": "1s",
            },
        }
        me.restart()
    yield a, r, b


def all_sent(homeserver: Homeserver, token: str, destination: Homeserver) -> bool:
    """Whether `homeserver` sent (directly or through relays) every event it has
    for `destination` (Synapse's admin federation API)."""
    path = "/_synapse/admin/v1/federation/destinations/" + quote(
        destination.server_name
    )
    sent = homeserver.client("GET", path, token=token).json()
    rooms = homeserver.client("GET", path + "/rooms", token=token).json()["rooms"]
    last = sent.get("last_successful_stream_ordering") or 0
    return all(room["stream_ordering"] <= last for room in rooms)


def held_devices(
    fake: FakeServer, relay: Homeserver, server: Homeserver, user_id: str
) -> set[str]:
    response = fake.request(
        "GET",
        relay,
        keys_path(server.server_name, "/user/devices/") + quote(user_id),
    )
    if response.status_code != 200:
        return set()
    return {d["device_id"] for d in response.json()["devices"]}


def escrowed_for(
    fake: FakeServer, relay: Homeserver, server: Homeserver, user_id: str, device: str
) -> bool:
    """Whether R holds `device`'s keys (asked as a third server, which claims
    nothing: it only reads the device list)."""
    return device in held_devices(fake, relay, server, user_id)


def test_new_device_messages_decrypt_while_each_side_is_offline(
    servers: tuple[Homeserver, Homeserver, Homeserver],
    fake_servers: FakeServerFactory,
    tmp_path: Path,
) -> None:
    a, r, b = servers
    fake = fake_servers.create()
    for homeserver, name in ((a, "alice"), (b, "bob")):
        homeserver.register_user(name, password="password")
    admin_a = a.register_user("admin", admin=True)
    alice_id, bob_id = a.user_id("alice"), b.user_id("bob")
    alice1 = Device(a, "alice", tmp_path / "alice1")
    bob = Device(b, "bob", tmp_path / "bob")
    devices = [alice1, bob]
    try:
        response = alice1.run(
            alice1.client.room_create(initial_state=[ENCRYPTION], invite=[bob_id])
        )
        room_id = response.room_id

        def bob_invited() -> bool:
            bob.sync()
            return room_id in bob.client.invited_rooms

        wait_until(bob_invited, TIMEOUT, message="bob's invite")
        bob.run(bob.client.join(room_id))
        bob.sync()

        def alice_sees_bob() -> bool:
            alice1.sync()
            room = alice1.client.rooms.get(room_id)
            return room is not None and bob_id in room.users

        wait_until(alice_sees_bob, TIMEOUT, message="bob's join at A")
        # bob's device and its escrowed one-time keys on R, before B goes offline
        wait_until(
            lambda: escrowed_for(fake, r, b, bob_id, bob.device_id),
            TIMEOUT,
            message="bob's keys on R",
        )
        b.stop()

        alice2 = Device(a, "alice", tmp_path / "alice2")
        devices.append(alice2)
        wait_until(
            lambda: escrowed_for(fake, r, a, alice_id, alice2.device_id),
            TIMEOUT,
            message="alice's new device's keys on R",
        )
        sent = [f"secret {i} from a new device" for i in range(3)]
        started = time.monotonic()
        for text in sent:
            alice2.send(room_id, text)
        wait_until(lambda: all_sent(a, admin_a, b), TIMEOUT, message="deposits on R")
        print(f"3 messages sent and deposited in {time.monotonic() - started:.1f}s")
        a.stop()

        b.start()

        def bob_decrypted() -> bool:
            bob.sync()
            return set(sent) <= set(bob.texts)

        wait_until(bob_decrypted, TIMEOUT, message="bob decrypting alice's messages")
        decrypted = len([t for t in bob.texts if t in sent])
        print(f"sent from a new device while B was offline: 3, decrypted: {decrypted}")
        assert [t for t in bob.texts if t in sent] == sent

        def bob_lists_new_device() -> bool:
            bob.sync()
            return alice2.device_id in bob.devices_of(alice_id)

        wait_until(bob_lists_new_device, TIMEOUT, message="alice's new device at bob")
    finally:
        for device in devices:
            device.close()
