"""The relay role on real Synapse processes, as other servers talk to it (DESIGN.md 2).

Each backend (SQLite, PostgreSQL) gets four homeservers with the module:

- `main`: holds mail for bob and eve, deposits from anyone;
- `strict`: holds mail for bob only, deposits from alice only, tiny quotas;
- `purging`: holds mail for anyone, 2 s retention;
- `off`: the module loaded with the relay role disabled.

alice, bob, carol and eve are fake federation servers (tests/harness/fedclient.py)
whose signing keys the homeservers fetch from them for real.
"""

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from signedjson.sign import sign_json

from synapse_relay.loopback import Homeserver, wait_until
from synapse_relay.protocol import ORIGIN_AUTH
from tests.harness.fedclient import KEY_ID, FakeServer, quote

pytestmark = pytest.mark.integration


@dataclass
class Relays:
    main: Homeserver
    strict: Homeserver
    purging: Homeserver
    off: Homeserver
    alice: FakeServer
    bob: FakeServer
    carol: FakeServer
    eve: FakeServer
    admin_token: str


@pytest.fixture(scope="module")
def net(homeserver_factory: Any, fake_servers: Any) -> Iterator[Relays]:
    alice, bob, carol, eve = (fake_servers.create() for _ in range(4))
    main = homeserver_factory.create(
        module_config={
            "relay": {
                "enabled": True,
                "destinations": [bob.server_name, eve.server_name],
            }
        },
    )
    strict = homeserver_factory.create(
        module_config={
            "relay": {
                "enabled": True,
                "destinations": [bob.server_name],
                "origins": [alice.server_name],
                "max_transactions_per_destination": 3,
                "max_bytes_per_destination": 3000,
            }
        },
    )
    purging = homeserver_factory.create(
        module_config={
            "relay": {"enabled": True, "destinations": ["*"], "retention": "2s"}
        },
    )
    off = homeserver_factory.create(module_config={"relay": {"enabled": False}})
    yield Relays(
        main,
        strict,
        purging,
        off,
        alice,
        bob,
        carol,
        eve,
        admin_token=main.register_user("admin", admin=True),
    )


_counter = iter(range(1_000_000))


def new_txn_id() -> str:
    return f"txn{next(_counter)}-{time.monotonic_ns()}"


def transaction(n_pdus: int = 1, n_edus: int = 0, pad: int = 0, **extra: Any) -> dict:
    """A federation transaction body, shaped as Dendrite sends it."""
    return {
        "origin": "ignored.example",
        "origin_server_ts": 1_700_000_000_000,
        "destination": "ignored.example",
        "pdus": [
            {
                "type": "m.room.message",
                "room_id": "!room:ignored.example",
                "content": {"body": f"message {i}" + "x" * pad},
            }
            for i in range(n_pdus)
        ],
        "edus": [{"edu_type": "m.typing", "content": {}} for _ in range(n_edus)],
        **extra,
    }


def deposit(
    sender: FakeServer,
    relay: Homeserver,
    destination: str,
    body: Any = None,
    txn_id: str | None = None,
    **kwargs: Any,
) -> requests.Response:
    path = "/_matrix/federation/v1/send_relay/{}/{}".format(
        quote(txn_id or new_txn_id()), quote(f"@_relay:{destination}")
    )
    content = transaction() if body is None else body
    return sender.request("PUT", relay, path, content=content, **kwargs)


def collect(
    owner: FakeServer, relay: Homeserver, mailbox: str | None = None, **kwargs: Any
) -> requests.Response:
    user_id = mailbox or f"@_relay:{owner.server_name}"
    path = f"/_matrix/federation/v1/relay_txn/{quote(user_id)}"
    return owner.request("GET", relay, path, **kwargs)


def collect_all(owner: FakeServer, relay: Homeserver) -> list[dict]:
    """Collect and acknowledge everything queued for `owner`, oldest first."""
    transactions: list[dict] = []
    entry_id = 0
    while True:
        response = collect(owner, relay, content={"entry_id": entry_id})
        assert response.status_code == 200, response.text
        body = response.json()
        if not body["entries_queued"]:
            assert body == {"transaction": {}, "entry_id": 0, "entries_queued": False}
            return transactions
        transactions.append(body["transaction"])
        entry_id = body["entry_id"]


def queues(relays: Relays, relay: Homeserver | None = None) -> dict[str, dict]:
    server = relay or relays.main
    token = relays.admin_token if server is relays.main else admin_token(server)
    response = server.client("GET", "/_synapse/relay/v1/queues", token=token)
    assert response.status_code == 200, response.text
    return {q["destination"]: q for q in response.json()["queues"]}


def relay_status(net: Relays) -> dict:
    response = net.main.client(
        "GET", "/_synapse/relay/v1/status", token=net.admin_token
    )
    assert response.status_code == 200
    relay: dict = response.json()["relay"]
    return relay


_admin_tokens: dict[str, str] = {}


def admin_token(server: Homeserver) -> str:
    if server.server_name not in _admin_tokens:
        _admin_tokens[server.server_name] = server.register_user("admin", admin=True)
    return _admin_tokens[server.server_name]


def assert_error(response: requests.Response, status: int, errcode: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["errcode"] == errcode, response.text


# --- deposit and collect ---------------------------------------------------------


def test_deposit_then_owner_collects_in_order(net: Relays) -> None:
    txn_ids = [new_txn_id() for _ in range(3)]
    for i, txn_id in enumerate(txn_ids):
        response = deposit(
            net.alice, net.main, net.bob.server_name, transaction(i + 1), txn_id
        )
        assert response.status_code == 200, response.text
        assert response.json() == {}
    queue = queues(net)[net.bob.server_name]
    assert queue["transactions"] == 3
    assert queue["bytes"] > 0
    assert queue["oldest_ts"] <= int(time.time() * 1000)

    collected = collect_all(net.bob, net.main)
    assert [t["transaction_id"] for t in collected] == txn_ids
    for i, txn in enumerate(collected):
        # origin is the authenticated one, destination the userID's server
        assert txn["origin"] == net.alice.server_name
        assert txn["destination"] == net.bob.server_name
        assert txn["origin_server_ts"] == 1_700_000_000_000
        assert len(txn["pdus"]) == i + 1
        assert txn["pdus"][0]["content"]["body"] == "message 0"
    assert net.bob.server_name not in queues(net)


def test_deposit_is_idempotent(net: Relays) -> None:
    txn_id = new_txn_id()
    for _ in range(3):
        response = deposit(net.alice, net.main, net.bob.server_name, txn_id=txn_id)
        assert response.status_code == 200, response.text
    # the same txn id from another origin is another transaction
    assert deposit(net.carol, net.main, net.bob.server_name, txn_id=txn_id).ok
    collected = collect_all(net.bob, net.main)
    assert [(t["origin"], t["transaction_id"]) for t in collected] == [
        (net.alice.server_name, txn_id),
        (net.carol.server_name, txn_id),
    ]


def test_minimal_body_and_edus(net: Relays) -> None:
    assert deposit(net.alice, net.main, net.bob.server_name, {"pdus": []}).ok
    body = transaction(0, 100)
    assert deposit(net.alice, net.main, net.bob.server_name, body).ok
    first, second = collect_all(net.bob, net.main)
    assert first["edus"] == [] and first["pdus"] == []
    assert len(second["edus"]) == 100


def test_only_the_owner_collects(net: Relays) -> None:
    assert deposit(net.alice, net.main, net.bob.server_name).ok
    mailbox = f"@_relay:{net.bob.server_name}"
    for thief in (net.eve, net.alice):
        assert_error(collect(thief, net.main, mailbox), 403, "M_FORBIDDEN")
        assert_error(
            collect(thief, net.main, mailbox, content={"entry_id": 1}),
            403,
            "M_FORBIDDEN",
        )
    assert queues(net)[net.bob.server_name]["transactions"] == 1
    assert len(collect_all(net.bob, net.main)) == 1


def test_ack_deletes_only_that_entry_of_that_destination(net: Relays) -> None:
    for _ in range(3):
        assert deposit(net.alice, net.main, net.bob.server_name).ok
    assert deposit(net.alice, net.main, net.eve.server_name).ok
    eve_entry = collect(net.eve, net.main).json()["entry_id"]
    # bob acknowledging eve's entry deletes nothing of eve's
    response = collect(net.bob, net.main, content={"entry_id": eve_entry})
    assert response.status_code == 200
    bob_first = response.json()["entry_id"]
    assert queues(net)[net.eve.server_name]["transactions"] == 1
    # acknowledging the last of bob's entries deletes that one only, not a range
    third = bob_first + 2
    response = collect(net.bob, net.main, content={"entry_id": third})
    assert response.json()["entry_id"] == bob_first
    assert queues(net)[net.bob.server_name]["transactions"] == 2
    # acknowledging an already deleted entry is harmless
    assert collect(net.bob, net.main, content={"entry_id": third}).ok
    assert len(collect_all(net.bob, net.main)) == 2
    assert len(collect_all(net.eve, net.main)) == 1


def test_dendrite_shaped_requests(net: Relays) -> None:
    # Dendrite deposits the whole transaction object and collects with a GET whose
    # JSON body is signed as the request's content.
    for _ in range(3):
        assert deposit(net.alice, net.main, net.bob.server_name).ok
    first = collect(net.bob, net.main, content={"entry_id": 0}).json()
    assert first["entries_queued"] is True
    # ?entry_id= in the query (covered by the signature through the URI)
    second = collect(net.bob, net.main, query={"entry_id": str(first["entry_id"])})
    assert second.json()["entry_id"] > first["entry_id"]
    # no body at all: N = 0, nothing acknowledged
    again = collect(net.bob, net.main).json()
    assert again["entry_id"] == second.json()["entry_id"]
    # a body the signature does not cover never acknowledges
    unsigned = collect(
        net.bob, net.main, content={"entry_id": again["entry_id"]}, sign_content=False
    )
    assert_error(unsigned, 401, "M_UNAUTHORIZED")
    assert queues(net)[net.bob.server_name]["transactions"] == 2
    # ... but one that acknowledges nothing is ignored
    harmless = collect(net.bob, net.main, content={"entry_id": 0}, sign_content=False)
    assert harmless.json()["entry_id"] == again["entry_id"]
    assert len(collect_all(net.bob, net.main)) == 2


# --- configuration: allow-lists, quotas, retention, disabled ------------------------


def test_origins_and_destinations_allow_lists(net: Relays) -> None:
    assert_error(
        deposit(net.carol, net.strict, net.bob.server_name), 403, "M_FORBIDDEN"
    )
    assert_error(
        deposit(net.alice, net.strict, net.eve.server_name), 403, "M_FORBIDDEN"
    )
    assert_error(
        deposit(net.alice, net.main, net.carol.server_name), 403, "M_FORBIDDEN"
    )
    assert queues(net, net.strict) == {}
    assert net.carol.server_name not in queues(net)


def test_quotas_refuse_with_507_and_free_up(net: Relays) -> None:
    bob = net.bob.server_name
    txn_ids = [new_txn_id() for _ in range(4)]
    for txn_id in txn_ids[:3]:
        assert deposit(net.alice, net.strict, bob, txn_id=txn_id).ok
    refused = deposit(net.alice, net.strict, bob, txn_id=txn_ids[3])
    assert_error(refused, 507, "M_RESOURCE_LIMIT_EXCEEDED")
    assert "max_transactions_per_destination" in refused.json()["error"]
    # a repeat of a stored deposit is still answered as stored
    assert deposit(net.alice, net.strict, bob, txn_id=txn_ids[0]).ok
    assert queues(net, net.strict)[bob]["transactions"] == 3
    assert len(collect_all(net.bob, net.strict)) == 3

    big = deposit(net.alice, net.strict, bob, transaction(1, pad=3000))
    assert_error(big, 507, "M_RESOURCE_LIMIT_EXCEEDED")
    assert "max_bytes_per_destination" in big.json()["error"]
    assert deposit(net.alice, net.strict, bob, txn_id=txn_ids[3]).ok
    assert len(collect_all(net.bob, net.strict)) == 1


def test_retention_purges_old_entries(net: Relays) -> None:
    def purged() -> int:
        status = net.purging.client(
            "GET", "/_synapse/relay/v1/status", token=admin_token(net.purging)
        ).json()
        return int(status["relay"]["purged"])

    # The entry's presence is shown by the purge counter rather than by reading
    # the queue at once: on a loaded machine the 2 s retention may already have
    # purged it by then.
    before = purged()
    assert deposit(net.alice, net.purging, net.bob.server_name).ok
    wait_until(lambda: queues(net, net.purging) == {}, timeout=20)
    wait_until(lambda: purged() > before, timeout=20)
    assert collect(net.bob, net.purging).json()["entries_queued"] is False


def test_disabled_relay_answers_as_if_the_endpoints_did_not_exist(
    net: Relays,
) -> None:
    unknown = net.alice.request(
        "GET", net.off, "/_matrix/federation/v1/no_such_endpoint"
    )
    for response in (
        deposit(net.alice, net.off, net.bob.server_name),
        collect(net.bob, net.off),
    ):
        assert response.status_code == unknown.status_code, response.text
        assert response.json()["errcode"] == unknown.json()["errcode"]


# --- bad input ------------------------------------------------------------------


@pytest.mark.parametrize(
    "user_id",
    ["nobody", "@:x.example", "@bob:", "@bob:bad host", "@bob:[::1", "#room:x.org"],
)
def test_bad_user_id(net: Relays, user_id: str) -> None:
    path = f"/_matrix/federation/v1/send_relay/{new_txn_id()}/{quote(user_id)}"
    response = net.alice.request("PUT", net.main, path, content=transaction())
    assert_error(response, 400, "M_INVALID_PARAM")
    assert_error(collect(net.bob, net.main, mailbox=user_id), 400, "M_INVALID_PARAM")


@pytest.mark.parametrize(
    "body, errcode",
    [
        ({}, "M_BAD_JSON"),
        ({"pdus": "nope"}, "M_BAD_JSON"),
        ({"pdus": [1, 2]}, "M_BAD_JSON"),
        ({"pdus": [], "edus": {}}, "M_BAD_JSON"),
        ({"pdus": [], "origin_server_ts": "yesterday"}, "M_BAD_JSON"),
        (transaction(51), "M_BAD_JSON"),
        (transaction(0, 101), "M_BAD_JSON"),
        ([], "M_BAD_JSON"),
    ],
)
def test_bad_deposit_body(net: Relays, body: Any, errcode: str) -> None:
    before = queues(net)
    assert_error(deposit(net.alice, net.main, net.bob.server_name, body), 400, errcode)
    assert queues(net) == before


@pytest.mark.parametrize("raw", [b"not json", b"{", b"\xff\xfe", b'{"pdus": NaN}'])
def test_deposit_body_not_json(net: Relays, raw: bytes) -> None:
    path = "/_matrix/federation/v1/send_relay/{}/{}".format(
        new_txn_id(), quote(f"@_relay:{net.bob.server_name}")
    )
    response = net.alice.request("PUT", net.main, path, raw_body=raw)
    assert_error(response, 400, "M_NOT_JSON")


def test_deposit_without_body(net: Relays) -> None:
    path = "/_matrix/federation/v1/send_relay/{}/{}".format(
        new_txn_id(), quote(f"@_relay:{net.bob.server_name}")
    )
    assert_error(net.alice.request("PUT", net.main, path), 400, "M_NOT_JSON")


def test_bad_txn_id(net: Relays) -> None:
    response = deposit(net.alice, net.main, net.bob.server_name, txn_id="x" * 300)
    assert_error(response, 400, "M_INVALID_PARAM")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"content": {"entry_id": -1}},
        {"content": {"entry_id": "3"}},
        {"content": {"entry_id": 1.5}},
        {"content": {"entry_id": None}},
        {"query": {"entry_id": "-1"}},
        {"query": {"entry_id": "abc"}},
        {"content": {"entry_id": 1}, "query": {"entry_id": "2"}},
    ],
)
def test_bad_entry_id(net: Relays, kwargs: dict) -> None:
    assert deposit(net.alice, net.main, net.bob.server_name).ok
    assert_error(collect(net.bob, net.main, **kwargs), 400, "M_INVALID_PARAM")
    assert len(collect_all(net.bob, net.main)) == 1


@pytest.mark.parametrize("auth", [{"auth": False}, {"bad_signature": True}])
def test_missing_or_bad_x_matrix(net: Relays, auth: dict) -> None:
    assert deposit(net.alice, net.main, net.bob.server_name).ok
    assert_error(
        deposit(net.alice, net.main, net.bob.server_name, **auth), 401, "M_UNAUTHORIZED"
    )
    assert_error(
        collect(net.bob, net.main, content={"entry_id": 0}, **auth),
        401,
        "M_UNAUTHORIZED",
    )
    assert queues(net)[net.bob.server_name]["transactions"] == 1
    assert len(collect_all(net.bob, net.main)) == 1


def test_hostile_requests_get_4xx_and_change_nothing(net: Relays) -> None:
    bob = net.bob.server_name
    mailbox = quote(f"@_relay:{bob}")
    assert deposit(net.alice, net.main, bob).ok
    before = queues(net)
    nested = b"[" * 5000 + b"]" * 5000
    hostile: list[tuple[str, str, dict]] = [
        (
            "PUT",
            f"/_matrix/federation/v1/send_relay/x/{mailbox}",
            {"raw_body": b'{"pdus": ' + nested + b"}"},
        ),
        (
            "PUT",
            f"/_matrix/federation/v1/send_relay/x/{mailbox}",
            {"raw_body": b"\x00" * 1000},
        ),
        (
            "PUT",
            f"/_matrix/federation/v1/send_relay/x/{mailbox}",
            {
                "raw_body": b'{"pdus": ['
                + b'{"a": "'
                + b"x" * 200_000
                + b'"},' * 60
                + b"{}]}"
            },
        ),
        (
            "PUT",
            "/_matrix/federation/v1/send_relay/x/%40a%3A..%2F..%2Fetc",
            {"content": {"pdus": []}},
        ),
        (
            "PUT",
            f"/_matrix/federation/v1/send_relay/%00/{mailbox}",
            {"content": {"pdus": []}},
        ),
        (
            "PUT",
            f"/_matrix/federation/v1/send_relay/x/%40%00%3A{bob}",
            {"content": {"pdus": []}},
        ),
        (
            "PUT",
            f"/_matrix/federation/v1/send_relay/{'é' * 200}/{mailbox}",
            {"content": {"pdus": []}},
        ),
        (
            "PUT",
            f"/_matrix/federation/v1/send_relay/x/{mailbox}",
            {"raw_body": b'{"pdus": [{"k": "\\ud800"}]}'},
        ),
        ("GET", f"/_matrix/federation/v1/relay_txn/{mailbox}", {"raw_body": b"[1, 2]"}),
        (
            "GET",
            f"/_matrix/federation/v1/relay_txn/{mailbox}",
            {"raw_body": b"not json"},
        ),
        (
            "GET",
            f"/_matrix/federation/v1/relay_txn/{mailbox}",
            {"content": {"entry_id": 10**30}},
        ),
        (
            "GET",
            f"/_matrix/federation/v1/relay_txn/{mailbox}",
            {"query": {"entry_id": "9" * 40}},
        ),
        (
            "GET",
            f"/_matrix/federation/v1/relay_txn/{mailbox}",
            {"query": {"entry_id": "１"}},
        ),
        ("POST", f"/_matrix/federation/v1/relay_txn/{mailbox}", {"content": {}}),
        ("DELETE", f"/_matrix/federation/v1/send_relay/x/{mailbox}", {}),
        ("GET", "/_matrix/federation/v1/relay_txn/", {}),
        ("GET", f"/_matrix/federation/v1/relay_txn/{mailbox}/extra", {}),
    ]
    for method, path, kwargs in hostile:
        sender = net.bob if "relay_txn" in path else net.alice
        response = sender.request(method, net.main, path, **kwargs)
        assert 400 <= response.status_code < 500, (method, path, response.text[:300])
        assert "errcode" in response.json(), (method, path, response.text[:300])
    assert queues(net) == before
    # and the relay still serves
    assert deposit(net.alice, net.main, bob).ok
    assert len(collect_all(net.bob, net.main)) == 2


def test_concurrent_deposits_and_collects_of_one_destination(net: Relays) -> None:
    """Many senders at once, while the owner collects: every deposit is stored
    once (no 500 from contention on the destination's totals), nothing lost."""
    txn_ids = [new_txn_id() for _ in range(120)]
    collected: list[str] = []

    def owner_collects() -> None:
        entry_id = 0
        deadline = time.monotonic() + 120
        while len(collected) < len(txn_ids) and time.monotonic() < deadline:
            body = collect(net.bob, net.main, content={"entry_id": entry_id}).json()
            if body["entries_queued"]:
                collected.append(body["transaction"]["transaction_id"])
            entry_id = body["entry_id"]
        collect(net.bob, net.main, content={"entry_id": entry_id})  # the last ack

    with ThreadPoolExecutor(max_workers=33) as pool:
        collecting = pool.submit(owner_collects)
        statuses = list(
            pool.map(
                lambda txn_id: (
                    deposit(
                        net.alice, net.main, net.bob.server_name, txn_id=txn_id
                    ).status_code
                ),
                txn_ids,
            )
        )
        assert statuses == [200] * len(txn_ids)
        collecting.result(timeout=120)
    assert sorted(collected) == sorted(txn_ids)
    assert collect_all(net.bob, net.main) == []


def test_group_commit_under_concurrency(net: Relays) -> None:
    """Deposits in flight at once are committed in groups, each answered on its
    own: on `main`, four origins deposit in order for two destinations, each
    deposit sent twice at once (all 200, each stored once, FIFO per origin); on
    `strict` (3 transactions), 12 at once (exactly 3 answered 200, the others 507,
    and a repeat of a stored one 200 although the queue is full)."""
    bob, eve = net.bob.server_name, net.eve.server_name
    origins = [net.alice, net.carol, net.eve, net.bob]
    sent: dict[str, list[str]] = {bob: [], eve: []}

    def send_in_order(origin: FakeServer, txn_ids: list[str]) -> list[int]:
        return [
            deposit(origin, net.main, (bob, eve)[i % 2], txn_id=txn_id).status_code
            for i, txn_id in enumerate(txn_ids)
        ]

    sequences = [(o, [new_txn_id() for _ in range(10)]) for o in origins]
    for origin, txn_ids in sequences:
        for i, txn_id in enumerate(txn_ids):
            sent[(bob, eve)[i % 2]].append(f"{origin.server_name} {txn_id}")
    with ThreadPoolExecutor(max_workers=2 * len(sequences)) as pool:
        runs = [pool.submit(send_in_order, *seq) for seq in sequences * 2]
        assert [run.result(timeout=120) for run in runs] == [[200] * 10] * 8
    for owner in (net.bob, net.eve):
        got = [
            f"{t['origin']} {t['transaction_id']}" for t in collect_all(owner, net.main)
        ]
        assert sorted(got) == sorted(sent[owner.server_name])  # each once
        for origin, _ in sequences:  # in order per origin
            mine = [g for g in got if g.startswith(origin.server_name + " ")]
            assert mine == [s for s in sent[owner.server_name] if s in mine]

    collect_all(net.bob, net.strict)
    txn_ids = [new_txn_id() for _ in range(12)]
    with ThreadPoolExecutor(max_workers=12) as pool:
        statuses = list(
            pool.map(
                lambda txn_id: deposit(net.alice, net.strict, bob, txn_id=txn_id),
                txn_ids,
            )
        )
    accepted = [t for t, r in zip(txn_ids, statuses, strict=True) if r.ok]
    assert len(accepted) == 3
    for response in statuses:
        if not response.ok:
            assert_error(response, 507, "M_RESOURCE_LIMIT_EXCEEDED")
    assert deposit(net.alice, net.strict, bob, txn_id=accepted[1]).ok
    got = [t["transaction_id"] for t in collect_all(net.bob, net.strict)]
    assert sorted(got) == sorted(accepted)


# --- durability ---------------------------------------------------------------------


def test_restart_keeps_the_queue(net: Relays) -> None:
    txn_ids = [new_txn_id() for _ in range(3)]
    for txn_id in txn_ids:
        assert deposit(net.alice, net.main, net.bob.server_name, txn_id=txn_id).ok
    net.main.restart()
    assert [t["transaction_id"] for t in collect_all(net.bob, net.main)] == txn_ids


def test_kill_9_right_after_200_loses_nothing(net: Relays) -> None:
    txn_ids = [new_txn_id() for _ in range(20)]
    for txn_id in txn_ids:
        assert deposit(net.alice, net.main, net.bob.server_name, txn_id=txn_id).ok
    net.main.kill()
    net.main.start()
    assert [t["transaction_id"] for t in collect_all(net.bob, net.main)] == txn_ids


# --- admin API ---------------------------------------------------------------------


def test_admin_api_needs_an_admin(net: Relays) -> None:
    user = net.main.register_user("not_an_admin")
    for path in ("queues", "status"):
        url = f"/_synapse/relay/v1/{path}"
        assert net.main.client("GET", url).status_code == 401
        assert_error(net.main.client("GET", url, token="bogus"), 401, "M_UNKNOWN_TOKEN")
        assert_error(net.main.client("GET", url, token=user), 403, "M_FORBIDDEN")
    assert_error(
        net.main.client("GET", "/_synapse/relay/v1/nope", token=net.admin_token),
        404,
        "M_UNRECOGNIZED",
    )


def test_status_counts_the_relay_role(net: Relays) -> None:
    before = relay_status(net)
    txn_id = new_txn_id()
    assert deposit(net.alice, net.main, net.bob.server_name, txn_id=txn_id).ok
    assert deposit(net.alice, net.main, net.bob.server_name, txn_id=txn_id).ok
    assert deposit(net.alice, net.main, net.carol.server_name).status_code == 403
    assert (
        collect(net.eve, net.main, f"@_relay:{net.bob.server_name}").status_code == 403
    )
    collect_all(net.bob, net.main)
    after = relay_status(net)
    assert after["deposits_accepted"] - before["deposits_accepted"] == 1
    assert after["deposits_duplicate"] - before["deposits_duplicate"] == 1
    assert after["deposits_refused"] - before["deposits_refused"] == 1
    assert after["collects_refused"] - before["collects_refused"] == 1
    assert after["collects"] - before["collects"] == 2
    assert after["acknowledged"] - before["acknowledged"] == 1


# --- origin proof (DESIGN.md 2b) ----------------------------------------------------


def proven_body(
    sender: FakeServer, destination: str, txn_id: str, **changes: Any
) -> dict:
    """T for `destination` with `sender`'s origin proof; `changes` alter T after
    signing (a relay or an attacker tampering)."""
    t = {
        "origin": sender.server_name,
        "origin_server_ts": int(time.time() * 1000),
        "destination": destination,
        "transaction_id": txn_id,
        "pdus": transaction()["pdus"],
        "edus": [{"edu_type": "m.receipt", "content": {}}],
    }
    request = {
        "method": "PUT",
        "uri": f"/_matrix/federation/v1/send/{quote(txn_id)}",
        "origin": sender.server_name,
        "destination": destination,
        "content": t,
    }
    sig = sign_json(request, sender.server_name, sender.signing_key)
    proof = {"key": KEY_ID, "sig": sig["signatures"][sender.server_name][KEY_ID]}
    return {**t, **changes, ORIGIN_AUTH: proof}


def test_proven_deposit_is_stored_beside_its_proof(net: Relays) -> None:
    before = relay_status(net)
    bob = net.bob.server_name
    txn_id = new_txn_id()
    body = proven_body(net.alice, bob, txn_id)
    assert deposit(net.alice, net.main, bob, body, txn_id=txn_id).ok
    assert deposit(net.alice, net.main, bob, txn_id=new_txn_id()).ok  # unproven
    assert queues(net)[bob]["proven"] == 1
    first = collect(net.bob, net.main, content={"entry_id": 0}).json()
    proof = body.pop(ORIGIN_AUTH)
    assert first["transaction"] == body and first[ORIGIN_AUTH] == proof
    second = collect(net.bob, net.main, content={"entry_id": first["entry_id"]})
    assert ORIGIN_AUTH not in second.json()
    collect(net.bob, net.main, content={"entry_id": second.json()["entry_id"]})
    after = relay_status(net)
    assert after["deposits_proven"] - before["deposits_proven"] == 1
    assert after["deposits_unproven"] - before["deposits_unproven"] == 1


def test_bad_proofs_are_refused_and_nothing_stored(net: Relays) -> None:
    bob, eve = net.bob.server_name, net.eve.server_name
    before = relay_status(net)

    def refused(
        body: dict, status: int, txn_id: str, mailbox: str = bob, errcode: str = ""
    ) -> None:
        response = deposit(net.alice, net.main, mailbox, body, txn_id=txn_id)
        default = "M_INVALID_PARAM" if status == 400 else "M_UNAUTHORIZED"
        assert_error(response, status, errcode or default)

    t = new_txn_id()
    good = proven_body(net.alice, bob, t)
    # forged: signed by another server's key, or one byte of T altered
    forged = proven_body(net.carol, bob, t, origin=net.alice.server_name)
    refused(forged, 401, t)
    refused({**good, "origin_server_ts": good["origin_server_ts"] + 1}, 401, t)
    refused({**good, "pdus": []}, 401, t)
    # truncated or malformed proofs
    proof = good[ORIGIN_AUTH]
    refused({**good, ORIGIN_AUTH: {**proof, "sig": proof["sig"][:-4]}}, 401, t)
    refused({**good, ORIGIN_AUTH: {"key": proof["key"]}}, 400, t)
    # a key of the origin the relay cannot obtain (alice serves only KEY_ID)
    refused({**good, ORIGIN_AUTH: {**proof, "key": "ed25519:unknown"}}, 401, t)
    refused({**good, ORIGIN_AUTH: {**proof, "key": "rsa:1"}}, 400, t)
    refused({**good, ORIGIN_AUTH: "signed"}, 400, t)
    # not matching the authenticated origin, the mailbox or the transaction id
    refused(proven_body(net.carol, bob, t), 400, t)
    refused(good, 400, new_txn_id())
    # replayed for another destination: as is, or with destination rewritten
    refused(good, 400, t, mailbox=eve)
    refused({**good, "destination": eve}, 401, t, mailbox=eve)
    # a proof on a Dendrite-shaped body: fields missing, or others beside T's
    dendrite = {k: v for k, v in good.items() if k != "transaction_id"}
    refused(dendrite, 400, t)
    refused({**good, "pdu_failures": []}, 400, t)
    refused({**good, "edus": None}, 400, t, errcode="M_BAD_JSON")

    assert bob not in queues(net) and eve not in queues(net)
    after = relay_status(net)
    assert after["proofs_refused"] - before["proofs_refused"] == 15
    assert after["deposits_accepted"] == before["deposits_accepted"]
    # the genuine one is still accepted afterwards
    assert deposit(net.alice, net.main, bob, good, txn_id=t).ok
    assert len(collect_all(net.bob, net.main)) == 1
