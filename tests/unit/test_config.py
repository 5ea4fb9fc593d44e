"""Every configuration error is one line naming the full key (DESIGN.md section 3)."""

import pytest
from synapse.module_api.errors import ConfigError

from synapse_relay.config import (
    ReceiveConfig,
    RelayConfig,
    SendConfig,
    parse_config,
    parse_duration,
)


def error_of(raw: object) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    message = e.value.msg
    assert "\n" not in message
    return message


def test_empty_config_gives_defaults() -> None:
    config = parse_config({})
    assert config.relay == RelayConfig()
    assert not config.relay.enabled
    assert config.relay.origins == ("*",)
    assert config.relay.max_transactions_per_destination == 100_000
    assert config.relay.max_bytes_per_destination == 1073741824
    assert config.relay.retention_ms == 30 * 86400 * 1000
    assert config.relay.push
    assert config.relay.push_interval_max_ms == 60_000
    assert config.send == SendConfig()
    assert config.send.attempts_before_relay == 3
    assert config.receive == ReceiveConfig()
    assert config.receive.poll_interval_ms == 30_000
    assert parse_config(None) == config


def test_full_config_from_design() -> None:
    config = parse_config(
        {
            "relay": {
                "enabled": True,
                "destinations": ["b.example"],
                "origins": ["*"],
                "max_transactions_per_destination": 100000,
                "max_bytes_per_destination": 1073741824,
                "retention": "30d",
                "push": False,
                "push_interval_max": "5m",
            },
            "send": {
                "relays": {"b.example": ["relay.example", "relay2.example:8448"]},
                "attempts_before_relay": 3,
            },
            "receive": {"relays": ["relay.example"], "poll_interval": "30s"},
        }
    )
    assert config.relay.holds_mail_for("b.example")
    assert not config.relay.holds_mail_for("c.example")
    assert config.relay.accepts_from("anyone.example")
    assert not config.relay.push
    assert config.relay.push_interval_max_ms == 300_000
    assert config.send.relays == {"b.example": ("relay.example", "relay2.example:8448")}
    assert config.receive.relays == ("relay.example",)


def test_wildcards() -> None:
    relay = parse_config(
        {"relay": {"enabled": True, "destinations": ["*"], "origins": ["a.example"]}}
    ).relay
    assert relay.holds_mail_for("anything.example")
    assert relay.accepts_from("a.example")
    assert not relay.accepts_from("b.example")


@pytest.mark.parametrize(
    "text, ms",
    [
        ("500ms", 500),
        ("30s", 30_000),
        ("5m", 300_000),
        ("2h", 7_200_000),
        ("30d", 2_592_000_000),
        (1500, 1500),
        (" 7s ", 7000),
    ],
)
def test_durations(text: object, ms: int) -> None:
    assert parse_duration(text) == ms


@pytest.mark.parametrize("bad", ["30", "1w", "-5s", "s", "", True, -1, 1.5, None, []])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(
    "raw, message",
    [
        (
            {"send": {"attempts_before_relay": "three"}},
            "modules.synapse_relay.send.attempts_before_relay: must be an integer"
            ' >= 1, got "three"',
        ),
        (
            {"send": {"attempts_before_relay": 0}},
            "modules.synapse_relay.send.attempts_before_relay: must be an integer"
            " >= 1, got 0",
        ),
        (
            {"relay": {"enabled": "yes"}},
            'modules.synapse_relay.relay.enabled: must be true or false, got "yes"',
        ),
        (
            {"relay": {"enabled": True}},
            "modules.synapse_relay.relay.destinations: must list the server names"
            ' whose mail this relay holds (or ["*"] for anyone) when relay.enabled'
            " is true and relay.serve_registered is not, got []",
        ),
        (
            {"relay": {"serve_registered": 1}},
            "modules.synapse_relay.relay.serve_registered: must be true or false,"
            " got 1",
        ),
        (
            {"send": {"discover": "no"}},
            'modules.synapse_relay.send.discover: must be true or false, got "no"',
        ),
        (
            {"send": {"discover_interval": "500ms"}},
            "modules.synapse_relay.send.discover_interval: must be at least 1s,"
            ' got "500ms"',
        ),
        (
            {"relay": {"destinations": "b.example"}},
            "modules.synapse_relay.relay.destinations: must be a list of server"
            ' names (or ["*"] for any server), got "b.example"',
        ),
        (
            {"relay": {"origins": ["not a server"]}},
            "modules.synapse_relay.relay.origins: must be a list of server names"
            ' (or ["*"] for any server), got ["not a server"]',
        ),
        (
            {"relay": {"max_transactions_per_destination": -3}},
            "modules.synapse_relay.relay.max_transactions_per_destination: must be"
            " an integer >= 1, got -3",
        ),
        (
            {"relay": {"max_bytes_per_destination": "1GB"}},
            "modules.synapse_relay.relay.max_bytes_per_destination: must be an"
            ' integer >= 1, got "1GB"',
        ),
        (
            {"relay": {"retention": "forever"}},
            "modules.synapse_relay.relay.retention: must be a duration such as"
            ' "500ms", "30s", "5m", "2h", "30d" or an integer of milliseconds,'
            ' got "forever"',
        ),
        (
            {"relay": {"retention": "500ms"}},
            'modules.synapse_relay.relay.retention: must be at least 1s, got "500ms"',
        ),
        (
            {"relay": {"push": "yes"}},
            'modules.synapse_relay.relay.push: must be true or false, got "yes"',
        ),
        (
            {"relay": {"push_interval_max": "100ms"}},
            "modules.synapse_relay.relay.push_interval_max: must be at least 1s,"
            ' got "100ms"',
        ),
        (
            {"relay": {"enable": True}},
            "modules.synapse_relay.relay.enable: unknown option (expected one of:"
            " enabled, destinations, origins, max_transactions_per_destination,"
            " max_bytes_per_destination, retention, max_key_users_per_destination,"
            " push, push_interval_max, serve_registered)",
        ),
        (
            {"receive": {"escrowed_one_time_keys": 11}},
            "modules.synapse_relay.receive.escrowed_one_time_keys: must be an integer"
            " from 0 to 10, got 11",
        ),
        (
            {"receive": {"key_upload_interval": "10ms"}},
            "modules.synapse_relay.receive.key_upload_interval: must be 0 (never) or"
            ' at least 1s, got "10ms"',
        ),
        (
            {"relays": {}},
            "modules.synapse_relay.relays: unknown option (expected one of: relay,"
            " send, receive)",
        ),
        (
            {"send": {"relays": ["relay.example"]}},
            "modules.synapse_relay.send.relays: must be a mapping of server name to"
            ' a list of relays, got ["relay.example"]',
        ),
        (
            {"send": {"relays": {"b.example": "relay.example"}}},
            "modules.synapse_relay.send.relays.b.example: must be a list of server"
            ' names, got "relay.example"',
        ),
        (
            {"send": {"relays": {"b.example": ["*"]}}},
            "modules.synapse_relay.send.relays.b.example: must be a list of server"
            ' names, got ["*"]',
        ),
        (
            {"send": {"relays": {"bad name!": ["relay.example"]}}},
            "modules.synapse_relay.send.relays: keys must be server names,"
            ' got "bad name!"',
        ),
        (
            {"receive": {"relays": "relay.example"}},
            "modules.synapse_relay.receive.relays: must be a list of server names,"
            ' got "relay.example"',
        ),
        (
            {"receive": {"poll_interval": "10ms"}},
            "modules.synapse_relay.receive.poll_interval: must be at least 100ms,"
            ' got "10ms"',
        ),
        (
            {"receive": {"poll_interval": "often"}},
            "modules.synapse_relay.receive.poll_interval: must be a duration such as"
            ' "500ms", "30s", "5m", "2h", "30d" or an integer of milliseconds,'
            ' got "often"',
        ),
        (["relay"], 'modules.synapse_relay: must be a mapping, got ["relay"]'),
        (
            {"relay": "on"},
            'modules.synapse_relay.relay: must be a mapping, got "on"',
        ),
    ],
)
def test_errors_name_the_key(raw: object, message: str) -> None:
    assert error_of(raw) == message
