"""Parsing of the module's `config:` section of homeserver.yaml (DESIGN.md section 3).

Every problem raises Synapse's `ConfigError` with one line that names the full key,
says what was expected and shows what was given, e.g.::

    modules.synapse_relay.send.attempts_before_relay: must be an integer >= 1,
    got "three"

(on one line).

Unknown keys are errors too: a typo must not silently disable a role.
"""

import json
import re
from collections.abc import Callable, Mapping
from typing import Any, NoReturn, TypeVar

import attr
from synapse.module_api.errors import ConfigError

from synapse_relay._synapse import is_valid_server_name

KEY_PREFIX = "modules.synapse_relay"

_MS_PER_UNIT = {
    "ms": 1,
    "s": 1000,
    "m": 60 * 1000,
    "h": 60 * 60 * 1000,
    "d": 24 * 60 * 60 * 1000,
}
_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d)$")

T = TypeVar("T")


@attr.s(frozen=True, auto_attribs=True)
class RelayConfig:
    """The relay role: a drop box holding other servers' mail."""

    enabled: bool = False
    # Server names whose mail we hold; "*" means anyone.
    destinations: tuple[str, ...] = ()
    # Server names that may deposit; "*" means anyone.
    origins: tuple[str, ...] = ("*",)
    max_transactions_per_destination: int = 100_000
    max_bytes_per_destination: int = 1024 * 1024 * 1024
    retention_ms: int = 30 * _MS_PER_UNIT["d"]
    # key mailbox (docs/keys.rst): users whose keys a destination may keep here
    max_key_users_per_destination: int = 10_000
    # Deliver proven entries to their destination ourselves (push.py).
    push: bool = True
    # The cap of the backoff between probes of a destination that does not answer.
    push_interval_max_ms: int = _MS_PER_UNIT["m"]
    # Also hold mail for every server that registered by collecting from this
    # relay within the retention (docs/discovery.rst).
    serve_registered: bool = False

    def holds_mail_for(self, destination: str) -> bool:
        return "*" in self.destinations or destination in self.destinations

    def accepts_from(self, origin: str) -> bool:
        return "*" in self.origins or origin in self.origins


@attr.s(frozen=True, auto_attribs=True)
class SendConfig:
    """The send role: fall back to a destination's relays."""

    # destination -> its relays, in the order they are tried
    relays: Mapping[str, tuple[str, ...]] = attr.Factory(dict)
    attempts_before_relay: int = 3
    # Learn destinations' relays from their advertisements (discovery.py), and
    # fetch each one again when the copy held is older than this.
    discover: bool = True
    discover_interval_ms: int = _MS_PER_UNIT["h"]


@attr.s(frozen=True, auto_attribs=True)
class ReceiveConfig:
    """The receive role: collect our own mail from our relays."""

    relays: tuple[str, ...] = ()
    poll_interval_ms: int = 30 * _MS_PER_UNIT["s"]
    # key mailbox (docs/keys.rst): how often our keys are refreshed on our relays
    # (0: never), and how many one-time keys each device keeps escrowed per relay
    key_upload_interval_ms: int = 5 * _MS_PER_UNIT["m"]
    escrowed_one_time_keys: int = 2


@attr.s(frozen=True, auto_attribs=True)
class RelayModuleConfig:
    relay: RelayConfig = attr.Factory(RelayConfig)
    send: SendConfig = attr.Factory(SendConfig)
    receive: ReceiveConfig = attr.Factory(ReceiveConfig)


def parse_config(raw: Any) -> RelayModuleConfig:
    """Parse and validate the module's whole configuration."""
    section = _Section(raw if raw is not None else {}, KEY_PREFIX)
    section.only_keys("relay", "send", "receive")
    return RelayModuleConfig(
        relay=_parse_relay(section.subsection("relay")),
        send=_parse_send(section.subsection("send")),
        receive=_parse_receive(section.subsection("receive")),
    )


def parse_duration(value: Any) -> int:
    """Milliseconds from "500ms", "30s", "5m", "2h", "30d" or an integer of ms.

    Raises ValueError for anything else.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        match = _DURATION.match(value.strip())
        if match:
            return int(match.group(1)) * _MS_PER_UNIT[match.group(2)]
    raise ValueError(value)


def _parse_relay(section: "_Section") -> RelayConfig:
    defaults = RelayConfig()
    section.only_keys(
        "enabled",
        "destinations",
        "origins",
        "max_transactions_per_destination",
        "max_bytes_per_destination",
        "retention",
        "max_key_users_per_destination",
        "push",
        "push_interval_max",
        "serve_registered",
    )
    config = RelayConfig(
        enabled=section.boolean("enabled", defaults.enabled),
        destinations=section.server_names("destinations", defaults.destinations, True),
        origins=section.server_names("origins", defaults.origins, True),
        max_transactions_per_destination=section.positive_int(
            "max_transactions_per_destination",
            defaults.max_transactions_per_destination,
        ),
        max_bytes_per_destination=section.positive_int(
            "max_bytes_per_destination", defaults.max_bytes_per_destination
        ),
        retention_ms=section.duration("retention", defaults.retention_ms),
        max_key_users_per_destination=section.positive_int(
            "max_key_users_per_destination", defaults.max_key_users_per_destination
        ),
        push=section.get("push", defaults.push, _boolean, "must be true or false"),
        push_interval_max_ms=section.duration(
            "push_interval_max", defaults.push_interval_max_ms
        ),
        serve_registered=section.boolean("serve_registered", defaults.serve_registered),
    )
    if config.enabled and not config.destinations and not config.serve_registered:
        section.fail(
            "destinations",
            "must list the server names whose mail this relay holds "
            '(or ["*"] for anyone) when relay.enabled is true and'
            " relay.serve_registered is not",
            config.destinations,
        )
    if config.retention_ms < 1000:
        section.fail("retention", "must be at least 1s", section.raw.get("retention"))
    if config.push_interval_max_ms < 1000:
        section.fail(
            "push_interval_max",
            "must be at least 1s",
            section.raw.get("push_interval_max"),
        )
    return config


def _parse_send(section: "_Section") -> SendConfig:
    defaults = SendConfig()
    section.only_keys(
        "relays", "attempts_before_relay", "discover", "discover_interval"
    )
    raw_relays: Mapping[Any, Any] = section.get(
        "relays", {}, _mapping, "must be a mapping of server name to a list of relays"
    )
    relays = {}
    for destination in raw_relays:
        if not isinstance(destination, str) or not is_valid_server_name(destination):
            section.fail("relays", "keys must be server names", destination)
        relays[destination] = section.subsection("relays").server_names(
            destination, (), False
        )
    config = SendConfig(
        relays=relays,
        attempts_before_relay=section.positive_int(
            "attempts_before_relay", defaults.attempts_before_relay
        ),
        discover=section.boolean("discover", defaults.discover),
        discover_interval_ms=section.duration(
            "discover_interval", defaults.discover_interval_ms
        ),
    )
    if config.discover_interval_ms < 1000:
        section.fail(
            "discover_interval",
            "must be at least 1s",
            section.raw.get("discover_interval"),
        )
    return config


def _parse_receive(section: "_Section") -> ReceiveConfig:
    defaults = ReceiveConfig()
    section.only_keys(
        "relays", "poll_interval", "key_upload_interval", "escrowed_one_time_keys"
    )
    config = ReceiveConfig(
        relays=section.server_names("relays", defaults.relays, False),
        poll_interval_ms=section.duration("poll_interval", defaults.poll_interval_ms),
        key_upload_interval_ms=section.duration(
            "key_upload_interval", defaults.key_upload_interval_ms
        ),
        escrowed_one_time_keys=section.get(
            "escrowed_one_time_keys",
            defaults.escrowed_one_time_keys,
            _escrow_size,
            f"must be an integer from 0 to {MAX_ESCROWED_ONE_TIME_KEYS}",
        ),
    )
    if 0 < config.key_upload_interval_ms < 1000:
        section.fail(
            "key_upload_interval",
            "must be 0 (never) or at least 1s",
            section.raw.get("key_upload_interval"),
        )
    if config.poll_interval_ms < 100:
        section.fail(
            "poll_interval", "must be at least 100ms", section.raw.get("poll_interval")
        )
    return config


# The most one-time keys a device may have escrowed on one relay (the relay's
# quota too): Olm clients drop their oldest private keys beyond their own limit.
MAX_ESCROWED_ONE_TIME_KEYS = 10


def _escrow_size(value: Any) -> int:
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and 0 <= value <= MAX_ESCROWED_ONE_TIME_KEYS
    ):
        return value
    raise ValueError(value)


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(value)


def _mapping(value: Any) -> Mapping[Any, Any]:
    if isinstance(value, Mapping):
        return value
    raise ValueError(value)


def _positive_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(value)


class _Section:
    """One mapping of the configuration, with the dotted key path leading to it."""

    def __init__(self, raw: Any, path: str) -> None:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{path}: must be a mapping, got {_show(raw)}")
        self.raw = raw
        self.path = path

    def fail(self, key: str, expected: str, got: Any) -> NoReturn:
        raise ConfigError(f"{self.path}.{key}: {expected}, got {_show(got)}")

    def only_keys(self, *allowed: str) -> None:
        for key in self.raw:
            if key not in allowed:
                raise ConfigError(
                    f"{self.path}.{key}: unknown option"
                    f" (expected one of: {', '.join(allowed)})"
                )

    def subsection(self, key: str) -> "_Section":
        value = self.raw.get(key)
        return _Section({} if value is None else value, f"{self.path}.{key}")

    def get(
        self, key: str, default: T, convert: Callable[[Any], T], expected: str
    ) -> T:
        if key not in self.raw:
            return default
        try:
            return convert(self.raw[key])
        except ValueError:
            self.fail(key, expected, self.raw[key])

    def boolean(self, key: str, default: bool) -> bool:
        return self.get(key, default, _boolean, "must be true or false")

    def positive_int(self, key: str, default: int) -> int:
        return self.get(key, default, _positive_int, "must be an integer >= 1")

    def duration(self, key: str, default: int) -> int:
        return self.get(
            key,
            default,
            parse_duration,
            'must be a duration such as "500ms", "30s", "5m", "2h", "30d" '
            "or an integer of milliseconds",
        )

    def server_names(
        self, key: str, default: tuple[str, ...], allow_wildcard: bool
    ) -> tuple[str, ...]:
        expected = "must be a list of server names" + (
            ' (or ["*"] for any server)' if allow_wildcard else ""
        )

        def convert(value: Any) -> tuple[str, ...]:
            if not isinstance(value, list):
                raise ValueError(value)
            for name in value:
                if not isinstance(name, str):
                    raise ValueError(value)
                if not (name == "*" and allow_wildcard) and not is_valid_server_name(
                    name
                ):
                    raise ValueError(value)
            return tuple(value)

        return self.get(key, default, convert, expected)


def _show(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
