"""The origin proof's pure parts (proof.py) and the relay's check of a proven
deposit body (relay.proven_transaction); integration tests verify real
signatures between homeservers."""

from typing import Any

import pytest
from signedjson.key import generate_signing_key, get_verify_key
from signedjson.sign import SignatureVerifyException, sign_json, verify_signed_json
from synapse.api.errors import SynapseError

from synapse_relay import inbound, proof
from synapse_relay.protocol import ORIGIN_AUTH
from synapse_relay.relay import proven_transaction

A, B = "a.example", "b.example"


def t(**changes: Any) -> dict:
    return {
        "origin": A,
        "origin_server_ts": 1000,
        "destination": B,
        "transaction_id": "t/1",
        "pdus": [],
        "edus": [{"edu_type": "m.receipt", "content": {}}],
        **changes,
    }


def test_signed_request_is_the_x_matrix_object_of_the_direct_send() -> None:
    key = generate_signing_key("k")
    transaction = t()
    request = proof.signed_request(transaction)
    assert request["uri"] == "/_matrix/federation/v1/send/t%2F1"
    sig = sign_json(dict(request), A, key)["signatures"][A]["ed25519:k"]
    signed = proof.with_signature(transaction, proof.OriginProof("ed25519:k", sig))
    verify_signed_json(signed, A, get_verify_key(key))
    altered = proof.with_signature(
        t(origin_server_ts=1001), proof.OriginProof("ed25519:k", sig)
    )
    with pytest.raises(SignatureVerifyException):
        verify_signed_json(altered, A, get_verify_key(key))


def test_transaction_of_synapse_body() -> None:
    body = {"origin": A, "origin_server_ts": 1000, "pdus": []}
    assert proof.transaction_of(body, B, "t/1") == t(edus=[])


@pytest.mark.parametrize(
    "value",
    [
        None,
        "sig",
        {"key": "ed25519:k"},
        {"key": "ed25519:k", "sig": "s", "x": 1},
        {"key": "rsa:k", "sig": "s"},
        {"key": ["ed25519:k"], "sig": "s"},
        {"key": "ed25519:k", "sig": ""},
        {"key": "ed25519:k", "sig": "s" * 201},
    ],
)
def test_bad_proofs(value: Any) -> None:
    with pytest.raises(proof.BadProof):
        proof.parse_proof(value)


def test_ts_window() -> None:
    now = 10**12
    assert proof.ts_in_window(now, now) is None
    assert proof.ts_in_window(now + proof.MAX_FUTURE_SKEW_MS, now) is None
    assert "future" in str(proof.ts_in_window(now + proof.MAX_FUTURE_SKEW_MS + 1, now))
    assert "past" in str(proof.ts_in_window(now - proof.MAX_AGE_MS - 1, now))


def deposit(**changes: Any) -> tuple[dict, proof.OriginProof]:
    body = {**t(), ORIGIN_AUTH: {"key": "ed25519:k", "sig": "s"}, **changes}
    return proven_transaction(body, origin=A, destination=B, txn_id="t/1", now_ms=5)


def test_proven_deposit_body() -> None:
    assert deposit() == (t(), proof.OriginProof("ed25519:k", "s"))


@pytest.mark.parametrize(
    "changes, errcode",
    [
        ({"origin": "c.example"}, "M_INVALID_PARAM"),
        ({"destination": "c.example"}, "M_INVALID_PARAM"),
        ({"transaction_id": "t2"}, "M_INVALID_PARAM"),
        ({"pdu_failures": []}, "M_INVALID_PARAM"),
        ({ORIGIN_AUTH: {"key": "ed25519:k"}}, "M_INVALID_PARAM"),
        ({"edus": None}, "M_BAD_JSON"),
        ({"pdus": [1]}, "M_BAD_JSON"),
        ({"origin_server_ts": "1000"}, "M_BAD_JSON"),
    ],
)
def test_bad_proven_deposit_bodies(changes: dict, errcode: str) -> None:
    with pytest.raises(SynapseError) as e:
        deposit(**changes)
    assert e.value.code == 400 and e.value.errcode == errcode


def test_proven_deposit_without_a_field() -> None:
    body = {**t(), ORIGIN_AUTH: {"key": "ed25519:k", "sig": "s"}}
    del body["transaction_id"]
    with pytest.raises(SynapseError, match="missing transaction_id"):
        proven_transaction(body, origin=A, destination=B, txn_id="t/1", now_ms=5)


def test_hostile_edu_types_are_left_out_without_error() -> None:
    edus = [
        {"edu_type": ["m.receipt"], "content": {}},
        {
            "edu_type": "m.direct_to_device",
            "content": {"type": {"x": 1}, "sender": f"@a:{A}", "messages": {}},
        },
    ]
    prepared = inbound.prepare_transaction(t(edus=edus), B, now_ms=5)
    assert isinstance(prepared, inbound.Prepared)
    assert prepared.body["edus"] == []
    assert [inbound.edu_type_of(e) for e in edus] == ["other", "m.direct_to_device"]
