"""The harness itself: real homeservers on SQLite and PostgreSQL, and a fake
federation server whose signed requests they verify (or reject)."""

from pathlib import Path

import pytest
import requests

from tests.harness.client import Client
from tests.harness.fedclient import FakeServer, FakeServerFactory, quote
from tests.harness.homeserver import Homeserver, HomeserverError, HomeserverFactory
from tests.harness.postgres import Backend

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def hs(homeserver_factory: HomeserverFactory) -> Homeserver:
    return homeserver_factory.create(module_config={})


@pytest.fixture(scope="module")
def fake(fake_server_factory: FakeServerFactory) -> FakeServer:
    return fake_server_factory.create()


def query_profile(
    fake: FakeServer, hs: Homeserver, **kwargs: object
) -> requests.Response:
    """A federation request that requires authentication."""
    return fake.request(
        "GET",
        hs,
        "/_matrix/federation/v1/query/profile",
        query={"user_id": hs.user_id("nobody"), "field": "displayname"},
        **kwargs,  # type: ignore[arg-type]
    )


def test_homeserver_answers(hs: Homeserver, backend: Backend) -> None:
    engines = {"sqlite": "sqlite3", "postgres": "psycopg2"}
    assert hs.config()["database"]["name"] == engines[backend.name]
    assert hs.client("GET", "/health").status_code == 200
    version = hs.client("GET", "/_matrix/federation/v1/version")
    assert version.status_code == 200, version.text
    assert version.json()["server"]["name"] == "Synapse"


def test_admin_user(hs: Homeserver) -> None:
    token = hs.register_user("admin", admin=True)
    response = hs.client("GET", "/_synapse/admin/v1/server_version", token=token)
    assert response.status_code == 200, response.text
    assert "server_version" in response.json()
    user = f"/_synapse/admin/v2/users/{quote(hs.user_id('admin'))}"
    assert hs.client("GET", user, token=token).json()["admin"] is True
    plain = hs.register_user("plain")
    assert hs.client("GET", user, token=plain).status_code == 403


def test_signed_request_is_verified(hs: Homeserver, fake: FakeServer) -> None:
    response = query_profile(fake, hs)
    # 404: the user does not exist, so the signature was accepted, which needed
    # the homeserver to fetch the fake server's key from it.
    assert response.status_code == 404, response.text
    assert response.json()["errcode"] == "M_NOT_FOUND"
    assert any(path.startswith("/_matrix/key/v2/server") for _, path in fake.received)


def test_bad_requests_are_rejected(
    hs: Homeserver, fake: FakeServer, fake_server_factory: FakeServerFactory
) -> None:
    other = fake_server_factory.create()
    for kwargs in (
        {"bad_signature": True},
        {"auth": False},
        {"origin_override": other.server_name},
        # Synapse ignores a GET's body, so a signature covering one fails.
        {"content": {"entry_id": 0}},
    ):
        response = query_profile(fake, hs, **kwargs)
        assert response.status_code == 401, (kwargs, response.text)
    # ... and the same body, not covered by the signature, passes.
    response = query_profile(fake, hs, content={"entry_id": 0}, sign_content=False)
    assert response.status_code == 404, response.text


def test_unsigned_content_is_rejected(hs: Homeserver, fake: FakeServer) -> None:
    path = f"/_matrix/federation/v1/send/{quote('txn/1')}"
    body = {"origin": fake.server_name, "origin_server_ts": 0, "pdus": [], "edus": []}
    assert fake.request("PUT", hs, path, content=body).status_code == 200
    response = fake.request("PUT", hs, path, content=body, sign_content=False)
    assert response.status_code == 401, response.text


def test_restart_keeps_data(hs: Homeserver) -> None:
    hs.register_user("survivor")
    hs.restart()
    token = hs.login("survivor")
    whoami = hs.client("GET", "/_matrix/client/v3/account/whoami", token=token)
    assert whoami.json()["user_id"] == hs.user_id("survivor")


def test_failed_start_reports_logs(make_homeserver: object) -> None:
    with pytest.raises(HomeserverError, match="no_such_key") as error:
        make_homeserver({"no_such_key": 1})  # type: ignore[operator]
    assert "exited with code" in str(error.value)


def test_e2ee_client(hs: Homeserver, backend: Backend, tmp_path: Path) -> None:
    """tests/harness/client.py: two nio clients, an encrypted room, a message
    decrypted (the client API does not depend on the backend: SQLite only)."""
    if str(backend) != "sqlite":
        pytest.skip("the client harness is tested once")
    for user in ("carla", "dave"):
        hs.register_user(user)
    with (
        Client(hs, "carla", tmp_path / "carla") as carla,
        Client(hs, "dave", tmp_path / "dave") as dave,
    ):
        room_id = carla.create_room(encrypted=True, invite=[dave.user_id])
        dave.sync_until(lambda: room_id in dave.nio.invited_rooms, 30, "the invite")
        dave.join(room_id)
        carla.sync_until(
            lambda: dave.user_id in carla.nio.rooms[room_id].users, 30, "dave joined"
        )
        carla.send_text(room_id, "secret")
        dave.sync_until(lambda: "secret" in dave.texts(room_id), 30, "the message")
        assert not dave.undecrypted(room_id)
