"""A healthy start logs nothing alarming (issue 13): a homeserver with every role
(relay, send, receive from a relay that is up) starts, collects its mail, and its
log has no ERROR line, no traceback and no logcontext complaint.

An admin who greps the log for ERROR after an upgrade must not think the module
crashed.
"""

from typing import Any

import pytest

from tests.harness.fedclient import FakeServerFactory, quote
from tests.harness.homeserver import HomeserverFactory, log_problems, wait_until

pytestmark = pytest.mark.integration

# How long the start-up collection may take on a loaded machine.
COLLECTION_DEADLINE = 30


def ok(response: Any) -> Any:
    assert response.status_code == 200, f"{response.status_code} {response.text}"
    return response.json()


def test_start_with_every_role_logs_no_error(
    homeserver_factory: HomeserverFactory, fake_servers: FakeServerFactory
) -> None:
    relay = homeserver_factory.create(
        {"relay": {"enabled": True, "destinations": ["*"]}}
    )
    hs = homeserver_factory.create(None, start=False)
    # Mail waiting on the relay, for the start-up collection to process.
    sender = fake_servers.create()
    path = "/_matrix/federation/v1/send_relay/{}/{}".format(
        quote("clean-start"), quote(f"@_relay:{hs.server_name}")
    )
    ok(sender.request("PUT", relay, path, content={"pdus": [], "edus": []}))
    hs.module_config = {
        "relay": {"enabled": True, "destinations": ["*"]},
        # a destination that is down, so the send role has relays to use
        "send": {"relays": {"localhost:1": [relay.server_name]}},
        "receive": {"relays": [relay.server_name], "poll_interval": "1h"},
    }
    hs.start()
    admin = hs.register_user("admin", admin=True)

    def collected_at_start_up() -> bool:
        status = ok(hs.client("GET", "/_synapse/relay/v1/status", admin))
        counters = status["receive"]["relays"].get(relay.server_name, {})
        return bool(counters.get("processed", 0) >= 1)

    wait_until(collected_at_start_up, COLLECTION_DEADLINE, message="first collection")
    result = ok(hs.client("POST", "/_synapse/relay/v1/collect", admin))
    assert result["relays"][relay.server_name]["error"] is None, result

    for server in (hs, relay):
        assert log_problems(server) == [], f"{server}: {server.log_path}"
