"""Every touch of Synapse internals that the module API has no way to do.

Checked against matrix-synapse 1.163. Each function names the Synapse code it relies
on, so that a Synapse upgrade is this one folder's work (see SYNAPSE.md in the design
notes for how each fact was verified). Split by direction, each with its own users:

- `servlets`: serving the module's federation endpoints (relay.py);
- `inbound`: collecting from relays and feeding Synapse (collector.py);
- `outbound`: Synapse's federation sender and client (sender.py).

This package itself holds only light helpers that pure modules (config.py,
inbound.py) may import without pulling in Synapse's federation machinery.
"""

from collections.abc import Sequence
from typing import Any

import attr
from canonicaljson import encode_canonical_json
from synapse.api.errors import Codes, SynapseError

# config/_base.py: how Synapse reads its configuration files (see
# background_tasks_instance).
from synapse.config._base import read_config_files

# logging/context.py: Deferreds awaited through make_deferred_yieldable must be fired
# from the sentinel logcontext (see fire_in_sentinel_context).
from synapse.logging.context import PreserveLoggingContext
from synapse.module_api import (
    JsonDict,
    ModuleApi,
    SynapseRequest,
    parse_json_object_from_request,
)

# synapse/storage/engines: the engine class tells SQLite and PostgreSQL apart.
from synapse.storage.engines import PostgresEngine

# synapse/util/stringutils.py: the server-name grammar Synapse itself enforces.
from synapse.util.stringutils import parse_and_validate_server_name
from twisted.internet import defer


def is_valid_server_name(name: str) -> bool:
    try:
        parse_and_validate_server_name(name)
    except ValueError:
        return False
    return True


def read_json_object(
    request: SynapseRequest, *, encoded_later: bool = False
) -> JsonDict | None:
    """The request's JSON object body, None if it has none; else 400.

    Every body the module reads comes through here. Synapse's parser
    (http/servlet.py, `parse_json_object_from_request`) refuses what is not JSON
    or not an object, and NaN/Infinity literals; it accepts numbers and strings
    that canonical JSON cannot encode (1e400 parses as infinity, "\\ud800" as a
    lone surrogate), which then fail wherever Synapse encodes the body: checking
    its X-Matrix signature (federation/transport/server/_base.py) answers 500.
    So the body must also encode as canonical JSON: here, or (`encoded_later`)
    where the caller encodes it anyway, turning the failure into
    `canonical_json_refusal` (a 2 KB body's encoding is a few percent of a
    deposit's CPU).
    """
    assert request.content is not None
    request.content.seek(0)
    if not request.content.read(1):
        return None
    request.content.seek(0)
    content = parse_json_object_from_request(request)
    if not encoded_later:
        try:
            encode_canonical_json(content)
        except (ValueError, RecursionError) as e:
            raise canonical_json_refusal(e) from e
    return content


def canonical_json_refusal(error: ValueError | RecursionError) -> SynapseError:
    """The 400 for a body that canonical JSON cannot encode (UnicodeEncodeError,
    a lone surrogate, is a ValueError)."""
    reason = error.reason if isinstance(error, UnicodeEncodeError) else str(error)
    return SynapseError(
        400,
        f"The request body cannot be encoded as canonical JSON: {reason}",
        Codes.BAD_JSON,
    )


def background_tasks_instance(api: ModuleApi) -> str:
    """The name of the instance that runs background tasks (`main` for the main
    process, the default).

    config/workers.py: `WorkerConfig` keeps only whether this process runs them
    (the module API's `should_run_background_tasks()`), not the option
    `run_background_tasks_on` itself; config/_base.py: `RootConfig.config_files`
    are the files this process was started with, which `read_config_files` merges
    as Synapse did at start-up.
    """
    # synapse/module_api/__init__.py: ModuleApi keeps the HomeServer as `_hs`.
    config = read_config_files(api._hs.config.config_files)
    return str(config.get("run_background_tasks_on") or "main")


def is_postgres(txn: Any) -> bool:
    """Whether a `run_db_interaction` transaction runs on PostgreSQL."""
    return isinstance(txn.database_engine, PostgresEngine)


@attr.s(frozen=True, auto_attribs=True)
class HeldKey:
    """A server signing key we already hold (`server_keys_json`)."""

    # unpadded base64 of the public key
    key: str
    valid_until_ts: int


async def verify_signed_by(
    api: ModuleApi, server_name: str, signed: JsonDict, valid_at_ms: int
) -> None:
    """Raise unless `signed` carries a valid signature of `server_name` made with a
    key of that server valid at `valid_at_ms` (never 0: that accepts any key ever
    seen).

    crypto/keyring.py: `Keyring.verify_json_for_server` uses a key we hold with
    `valid_until_ts >= valid_at_ms` (any copy, whoever served it), else fetches the
    server's keys from it or the configured notaries; it raises (a SynapseError, or
    a fetch error) when no signature verifies.
    """
    assert valid_at_ms > 0, "validity 0 accepts any key ever seen"
    await api._hs.get_keyring().verify_json_for_server(server_name, signed, valid_at_ms)


def fire_in_sentinel_context(
    waiters: Sequence["defer.Deferred[Any]"], result: Any
) -> None:
    """Fire Deferreds that callers await through `make_deferred_yieldable`.

    synapse/logging/context.py: a Deferred must be fired from the sentinel
    logcontext (`PreserveLoggingContext`), otherwise the firing code's logcontext
    leaks into the waiters' code and back ("Expected logging context ... was lost").
    """
    with PreserveLoggingContext():
        for waiter in waiters:
            waiter.callback(result)
