"""A real Matrix client for tests: matrix-nio's AsyncClient with end-to-end
encryption, driven synchronously.

    with Client(homeserver, "alice", store_dir) as alice:   # logs in, uploads keys
        room_id = alice.create_room(encrypted=True, invite=[bob_id])
        alice.sync_until(lambda: ..., timeout=30)
        alice.send_text(room_id, "hello")                   # encrypted if the room is

- It talks to a loopback homeserver's client API (`homeserver.base_url`, TLS with
  the harness's self-signed certificate: verification is off).
- Its crypto store (Olm account, sessions, device keys) lives in `store_dir`: a
  tmp dir of the test. A new `Client` for the same user is a new device.
- It trusts every device it learns about (`trust_all`, run after each sync), so
  that messages are encrypted to every device of the room's members.
- `sync()` runs one `/sync`, then what a real client does after it: uploads its
  keys when needed, queries the devices of users whose device lists changed,
  and remembers what arrived: room timeline events (`timeline`, decrypted when
  it holds the room key), ephemeral events (`ephemeral`: receipts, typing),
  to-device events (`to_device`), and the users in `device_lists.changed`
  (`device_lists_changed`).
- `sync_until(condition, timeout)` syncs until `condition()` holds, with a
  deadline (never a sleep): use it for every "wait until the client sees X".

Each Client runs its own asyncio event loop; use it from one thread.
"""

import asyncio
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from nio import (
    AsyncClient,
    AsyncClientConfig,
    Event,
    LoginResponse,
    MegolmEvent,
    RoomCreateResponse,
    RoomMessageText,
    RoomSendResponse,
    SyncResponse,
)

from tests.harness.homeserver import DEFAULT_PASSWORD, Homeserver

T = TypeVar("T")

# How long one /sync waits for something new on the server.
SYNC_TIMEOUT_MS = 1_000


class ClientError(RuntimeError):
    """A client-API call answered with an error."""


class Client:
    def __init__(
        self,
        homeserver: Homeserver,
        localpart: str,
        store_dir: Path,
        password: str = DEFAULT_PASSWORD,
        device_name: str = "test device",
    ) -> None:
        self.homeserver = homeserver
        self.user_id = homeserver.user_id(localpart)
        self._loop = asyncio.new_event_loop()
        store_dir.mkdir(parents=True, exist_ok=True)
        self.nio = AsyncClient(
            homeserver.base_url,
            self.user_id,
            store_path=str(store_dir),
            config=AsyncClientConfig(encryption_enabled=True, store_sync_tokens=True),
            ssl=False,
        )
        # room id -> every timeline event seen, in order (MegolmEvent when it
        # could not be decrypted)
        self.timeline: dict[str, list[Event]] = {}
        # room id -> every ephemeral event seen (receipts, typing)
        self.ephemeral: dict[str, list[Any]] = {}
        self.to_device: list[Any] = []
        self.device_lists_changed: set[str] = set()
        login = self.run(self.nio.login(password, device_name=device_name))
        if not isinstance(login, LoginResponse):
            raise ClientError(f"login of {self.user_id} failed: {login}")
        self.device_id: str = login.device_id
        self._after_sync()

    # -- plumbing ------------------------------------------------------------

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run one of nio's coroutines to completion."""
        return self._loop.run_until_complete(coroutine)

    def close(self) -> None:
        self.run(self.nio.close())
        self._loop.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- sync ----------------------------------------------------------------

    def sync(self, timeout_ms: int = SYNC_TIMEOUT_MS) -> SyncResponse:
        response = self.run(self.nio.sync(timeout=timeout_ms))
        if not isinstance(response, SyncResponse):
            raise ClientError(f"sync of {self.user_id} failed: {response}")
        for room_id, room in response.rooms.join.items():
            self.timeline.setdefault(room_id, []).extend(room.timeline.events)
            self.ephemeral.setdefault(room_id, []).extend(room.ephemeral)
        self.to_device.extend(response.to_device_events)
        self.device_lists_changed.update(response.device_list.changed)
        self._after_sync()
        return response

    def _after_sync(self) -> None:
        """What a client does after a sync (nio's sync_forever does the same)."""
        client = self.nio
        if client.should_upload_keys:
            self.run(client.keys_upload())
        if client.should_query_keys:
            self.run(client.keys_query())
        self.trust_all()

    def sync_until(
        self, condition: Callable[[], bool], timeout: float, what: str = "condition"
    ) -> None:
        """Sync until `condition()` is true; AssertionError after `timeout` s."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.user_id} ({self.device_id}): {what} not seen after"
                    f" {timeout} s"
                )
            self.sync()

    def trust_all(self) -> None:
        """Mark every device we know of (other than ours) as verified."""
        for device in self.nio.device_store:
            if device.device_id != self.device_id and not device.verified:
                self.nio.verify_device(device)

    # -- rooms and messages --------------------------------------------------

    def create_room(self, encrypted: bool, invite: Sequence[str] = ()) -> str:
        initial_state = []
        if encrypted:
            initial_state.append(
                {
                    "type": "m.room.encryption",
                    "state_key": "",
                    "content": {"algorithm": "m.megolm.v1.aes-sha2"},
                }
            )
        response = self.run(
            self.nio.room_create(invite=list(invite), initial_state=initial_state)
        )
        if not isinstance(response, RoomCreateResponse):
            raise ClientError(f"createRoom failed: {response}")
        room_id: str = response.room_id
        self.sync_until(lambda: room_id in self.nio.rooms, 30, "the new room")
        return room_id

    def join(self, room_id: str) -> None:
        response = self.run(self.nio.join(room_id))
        if getattr(response, "room_id", None) != room_id:
            raise ClientError(f"join of {room_id} failed: {response}")
        self.sync_until(lambda: room_id in self.nio.rooms, 30, "the joined room")

    def send_text(self, room_id: str, body: str) -> str:
        """Send a text message (Megolm-encrypted in an encrypted room, shared with
        every device of the members first if needed); its event id."""
        if self.nio.should_claim_keys:
            self.run(self.nio.keys_claim(self.nio.get_users_for_key_claiming()))
        response = self.run(
            self.nio.room_send(
                room_id,
                "m.room.message",
                {"msgtype": "m.text", "body": body},
                ignore_unverified_devices=True,
            )
        )
        if not isinstance(response, RoomSendResponse):
            raise ClientError(f"send to {room_id} failed: {response}")
        event_id: str = response.event_id
        return event_id

    def rotate_room_key(self, room_id: str) -> None:
        """Discard our outbound Megolm session of the room: the next message
        shares a new room key with every device (over Olm to-device messages)."""
        self.nio.olm.outbound_group_sessions.pop(room_id, None)

    def texts(self, room_id: str) -> list[str]:
        """The bodies of the decrypted text messages seen in the room, in order."""
        return [
            event.body
            for event in self.timeline.get(room_id, [])
            if isinstance(event, RoomMessageText)
        ]

    def undecrypted(self, room_id: str) -> list[MegolmEvent]:
        """The encrypted events of the room we could not decrypt."""
        return [
            event
            for event in self.timeline.get(room_id, [])
            if isinstance(event, MegolmEvent)
        ]
