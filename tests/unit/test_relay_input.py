"""The relay endpoints' input checks: each bad input is a 4xx with its errcode."""

import pytest
from synapse.api.errors import SynapseError

from synapse_relay.protocol import MAX_EDUS, MAX_PDUS
from synapse_relay.relay import (
    build_transaction,
    destination_of,
    parse_collect_body,
    parse_entry_id,
    validate_txn_id,
)


def errcode_of(call: object, *args: object, **kwargs: object) -> tuple[int, str]:
    with pytest.raises(SynapseError) as e:
        call(*args, **kwargs)  # type: ignore[operator]
    return e.value.code, e.value.errcode


@pytest.mark.parametrize(
    "user_id, server",
    [
        ("@bob:b.example", "b.example"),
        ("@bob:localhost:8448", "localhost:8448"),
        ("@_relay:[::1]:8448", "[::1]:8448"),
        ("@x:127.0.0.1", "127.0.0.1"),
    ],
)
def test_destination_of(user_id: str, server: str) -> None:
    assert destination_of(user_id) == server


@pytest.mark.parametrize(
    "user_id",
    [
        "",
        "bob:b.example",
        "@bob",
        "@:b.example",
        "@bob:",
        "@bob:bad host",
        "@bob:b.example:port",
        "@bob:[::1",
        "@" + "x" * 250 + ":b.example",
        "#r:b.example",
        "@\x00:b.example",
        "@bob smith:b.example",
        "@bób:b.example",
    ],
)
def test_bad_user_ids(user_id: str) -> None:
    assert errcode_of(destination_of, user_id) == (400, "M_INVALID_PARAM")


@pytest.mark.parametrize(
    "txn_id", ["", "x" * 256, "a\x00b", "tab\t", "\ud800", "é" * 128]
)
def test_bad_txn_ids(txn_id: str) -> None:
    assert errcode_of(validate_txn_id, txn_id) == (400, "M_INVALID_PARAM")


def build(content: object) -> dict:
    return build_transaction(
        content,  # type: ignore[arg-type]
        origin="a.example",
        destination="b.example",
        txn_id="t1",
        now_ms=42,
    )


def test_transaction_takes_origin_and_destination_from_authentication() -> None:
    txn = build(
        {
            "origin": "liar.example",
            "destination": "elsewhere.example",
            "transaction_id": "other",
            "origin_server_ts": 7,
            "pdus": [{"type": "m.room.message"}],
            "extra": "dropped",
        }
    )
    assert txn == {
        "origin": "a.example",
        "origin_server_ts": 7,
        "destination": "b.example",
        "transaction_id": "t1",
        "pdus": [{"type": "m.room.message"}],
        "edus": [],
    }


def test_limits_are_inclusive() -> None:
    txn = build({"pdus": [{}] * MAX_PDUS, "edus": [{}] * MAX_EDUS})
    assert len(txn["pdus"]) == MAX_PDUS and len(txn["edus"]) == MAX_EDUS
    assert build({"pdus": []})["origin_server_ts"] == 42


@pytest.mark.parametrize(
    "content, errcode",
    [
        (None, "M_NOT_JSON"),
        ({}, "M_BAD_JSON"),
        ({"pdus": None}, "M_BAD_JSON"),
        ({"pdus": {}}, "M_BAD_JSON"),
        ({"pdus": ["a string"]}, "M_BAD_JSON"),
        ({"pdus": [{}] * (MAX_PDUS + 1)}, "M_BAD_JSON"),
        ({"pdus": [], "edus": [{}] * (MAX_EDUS + 1)}, "M_BAD_JSON"),
        ({"pdus": [], "edus": "x"}, "M_BAD_JSON"),
        ({"pdus": [], "edus": [1]}, "M_BAD_JSON"),
        ({"pdus": [], "origin_server_ts": "now"}, "M_BAD_JSON"),
        ({"pdus": [], "origin_server_ts": True}, "M_BAD_JSON"),
    ],
)
def test_bad_transactions(content: object, errcode: str) -> None:
    assert errcode_of(build, content) == (400, errcode)


@pytest.mark.parametrize(
    "content, query, entry_id",
    [
        (None, {}, 0),
        ({}, {}, 0),
        ({"entry_id": 5}, {}, 5),
        (None, {b"entry_id": [b"7"]}, 7),
        ({"entry_id": 7}, {b"entry_id": [b"7"]}, 7),
        ({"entry_id": 2**63 - 1}, {}, 2**63 - 1),
    ],
)
def test_entry_id(content: object, query: dict, entry_id: int) -> None:
    assert parse_entry_id(content, query) == entry_id  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "content, query",
    [
        ({"entry_id": -1}, {}),
        ({"entry_id": "5"}, {}),
        ({"entry_id": 1.5}, {}),
        ({"entry_id": True}, {}),
        ({"entry_id": None}, {}),
        ({"entry_id": 2**63}, {}),
        (None, {b"entry_id": [b"-1"]}),
        (None, {b"entry_id": [b"abc"]}),
        (None, {b"entry_id": [b""]}),
        (None, {b"entry_id": [b"\xff"]}),
        (None, {b"entry_id": [b"1", b"2"]}),
        ({"entry_id": 1}, {b"entry_id": [b"2"]}),
    ],
)
def test_bad_entry_ids(content: object, query: dict) -> None:
    assert errcode_of(parse_entry_id, content, query) == (400, "M_INVALID_PARAM")


@pytest.mark.parametrize(
    "content, acknowledged, limit",
    [
        (None, [], 10),
        ({}, [], 10),
        ({"limit": 1, "acknowledge": [3, 1, 3]}, [3, 1], 1),
        ({"limit": 100}, [], 100),
        ({"limit": 101}, [], 100),
        ({"limit": 10**9}, [], 100),
        ({"acknowledge": list(range(1000))}, list(range(1000)), 10),
    ],
)
def test_collect_body(content: object, acknowledged: list[int], limit: int) -> None:
    assert parse_collect_body(content) == (acknowledged, limit)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "content",
    [
        {"limit": 0},
        {"limit": -1},
        {"limit": "x"},
        {"limit": 1.5},
        {"limit": True},
        {"limit": None},
        {"acknowledge": 1},
        {"acknowledge": ["1"]},
        {"acknowledge": [-1]},
        {"acknowledge": [2**63]},
        {"acknowledge": list(range(1001))},
    ],
)
def test_bad_collect_bodies(content: object) -> None:
    assert errcode_of(parse_collect_body, content) == (400, "M_INVALID_PARAM")
