"""The key mailbox's pure checks: what a snapshot or a claim must be."""

from typing import Any

import pytest
from signedjson.key import (
    encode_verify_key_base64,
    generate_signing_key,
    get_verify_key,
)
from signedjson.sign import sign_json
from synapse.module_api.errors import SynapseError

from synapse_relay.keys.snapshot import (
    MAX_DEVICES_PER_CLAIM,
    answer_query,
    parse_claim,
    parse_snapshot,
)

SERVER = "owner.example"
USER = f"@alice:{SERVER}"


def device(device_id: str, user_id: str = USER) -> tuple[Any, dict[str, Any]]:
    key = generate_signing_key(device_id)
    keys = {
        "user_id": user_id,
        "device_id": device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
        "keys": {
            f"ed25519:{device_id}": encode_verify_key_base64(get_verify_key(key)),
            f"curve25519:{device_id}": "Y3VydmU",
        },
    }
    return key, sign_json(keys, user_id, key)


def snapshot(**fields: Any) -> dict[str, Any]:
    key, keys = device("PHONE")
    fallback = sign_json({"key": "ZmFsbGJhY2s", "fallback": True}, USER, key)
    return {
        "user_id": USER,
        "stream_id": 3,
        "devices": [{"device_id": "PHONE", "keys": keys}, {"device_id": "OLD"}],
        "master_key": {"user_id": USER, "usage": ["master"], "keys": {}},
        "fallback_keys": {"PHONE": {"signed_curve25519:F1": fallback}},
        "ts": 1000,
        **fields,
    }


def test_a_good_snapshot_answers_the_federation_shapes() -> None:
    parsed = parse_snapshot(SERVER, snapshot())
    assert set(parsed.device_keys) == {"PHONE"}
    assert parsed.answer_devices()["stream_id"] == 3
    assert "fallback_keys" not in parsed.answer_devices()
    assert parsed.fallback_key("PHONE", "signed_curve25519")[0] == (
        "signed_curve25519:F1"
    )
    answer = answer_query({USER: ["PHONE", "GONE"]}, {USER: parsed.json})
    assert list(answer["device_keys"][USER]) == ["PHONE"]
    assert answer["master_keys"][USER]["usage"] == ["master"]
    assert answer_query({USER: []}, {})["device_keys"] == {}


def tampered_device() -> dict[str, Any]:
    value = snapshot()
    value["devices"][0]["keys"]["keys"]["curve25519:PHONE"] = "Zm9yZ2Vk"
    return value


def another_key() -> dict[str, Any]:
    value = snapshot()
    _, forged = device("PHONE")
    value["devices"][0]["keys"] = forged | {"keys": value["devices"][0]["keys"]["keys"]}
    return value


@pytest.mark.parametrize(
    "value, code, errcode",
    [
        (tampered_device(), 400, "M_INVALID_SIGNATURE"),
        (another_key(), 400, "M_INVALID_SIGNATURE"),
        (snapshot(user_id="@mallory:other.example"), 403, "M_FORBIDDEN"),
        (snapshot(user_id="nobody"), 400, "M_INVALID_PARAM"),
        (snapshot(ts="yesterday"), 400, "M_BAD_JSON"),
        (snapshot(devices={"PHONE": {}}), 400, "M_BAD_JSON"),
        (snapshot(devices=[{"device_id": "A"}, {"device_id": "A"}]), 400, "M_BAD_JSON"),
        (
            snapshot(devices=[{"device_id": str(i)} for i in range(201)]),
            400,
            "M_BAD_JSON",
        ),
        (snapshot(master_key={"user_id": "@bob:owner.example"}), 400, "M_BAD_JSON"),
        (
            snapshot(fallback_keys={"PHONE": {"signed_curve25519:F": {"key": "x"}}}),
            400,
            "M_INVALID_SIGNATURE",
        ),
        (
            snapshot(fallback_keys={"OLD": {"curve25519:F": {"key": "x"}}}),
            400,
            "M_BAD_JSON",
        ),
        (snapshot(padding="x" * 300_000), 413, "M_TOO_LARGE"),
        ([], 400, "M_BAD_JSON"),
    ],
)
def test_bad_snapshots_are_refused(value: Any, code: int, errcode: str) -> None:
    with pytest.raises(SynapseError) as e:
        parse_snapshot(SERVER, value)
    assert (e.value.code, e.value.errcode) == (code, errcode)


def test_claims_in_both_shapes() -> None:
    body = {"one_time_keys": {USER: {"A": "signed_curve25519", "B": ["x", "x", "y"]}}}
    assert parse_claim(SERVER, body) == [
        (USER, "A", "signed_curve25519"),
        (USER, "B", "x"),
        (USER, "B", "y"),
    ]


@pytest.mark.parametrize(
    "body",
    [
        None,
        {},
        {"one_time_keys": []},
        {"one_time_keys": {"@eve:other.example": {"A": "x"}}},
        {"one_time_keys": {USER: {"A": 1}}},
        {"one_time_keys": {USER: {"A": [""]}}},
        {
            "one_time_keys": {
                USER: {str(i): "x" for i in range(MAX_DEVICES_PER_CLAIM + 1)}
            }
        },
    ],
)
def test_bad_claims_are_refused(body: Any) -> None:
    with pytest.raises(SynapseError) as e:
        parse_claim(SERVER, body)
    assert e.value.code == 400
