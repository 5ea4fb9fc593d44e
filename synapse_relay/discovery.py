"""Relay discovery (DESIGN.md 2b): servers advertise their relays, senders learn them.

- *Advertise* (`Advertiser`, every process with the module): the federation query
  `synapse_relay.relays` is answered with this server's `receive.relays` (an empty
  list when it has none), signed with its server signing key:
  `{"server_name", "relays", "ts", "valid_until_ts", "signatures"}`, valid for
  `ADVERTISEMENT_VALIDITY_MS`.
- *Learn* (`Discovery`, send role, `send.discover`): after a transaction that a
  destination accepted directly, its advertisement is fetched in the background
  when the copy held is older than `send.discover_interval` (1 h by default), so
  only while the destination answers, and at most one query per destination per
  interval, whatever it answered (a server without the module answers 404 and
  costs one query per interval). An advertisement is kept only when
  `check_advertisement` finds it well formed, unexpired and naming the
  destination, the destination's signature verifies with a key valid now
  (Synapse's keyring), and it is not older than the one held; otherwise it is
  refused with a warning and a counter, and the one held stays.

Which relays a destination has is decided in one place, `directory.choose_relays`
(admin API > `send.relays` > discovered). See docs/discovery.rst.
"""

import enum
import json
import logging
from collections.abc import Callable
from typing import Any, Protocol

import attr
from canonicaljson import encode_canonical_json
from synapse.module_api import JsonDict, ModuleApi

from synapse_relay._synapse import is_valid_server_name
from synapse_relay._synapse.discovery import (
    BadSignature,
    DiscoveryFederation,
    NoQueryHandler,
    QueryFailed,
    serve_query,
    sign_as_this_server,
)
from synapse_relay.config import ReceiveConfig, SendConfig
from synapse_relay.protocol import MAX_RELAYS, RELAYS_QUERY_TYPE
from synapse_relay.stats import RoleStats
from synapse_relay.store import Advertisement, RelayStore

logger = logging.getLogger(__name__)

DAY_MS = 24 * 60 * 60 * 1000
# How long an advertisement stays valid: a sender keeps using the relays it names
# for that long while the server is unreachable (matching the default retention
# of a relay), and forgets them after.
ADVERTISEMENT_VALIDITY_MS = 30 * DAY_MS
# Larger answers are refused (20 relays of 255 bytes and a few signatures fit).
MAX_ADVERTISEMENT_BYTES = 16 * 1024
# An advertisement dated further in the future is refused: being "newest", it
# would shut out the server's genuine later ones until then.
MAX_CLOCK_SKEW_MS = 60 * 60 * 1000

DISCOVERY_COUNTERS = {
    "advertisements_served": "Advertisements of our relays served to other servers",
    "fetched": "Advertisements fetched, verified and kept",
    "no_module": "Queries answered 404 (a server without the module)",
    "failed": "Queries that got no answer, or an error other than 404",
    "refused_invalid": "Advertisements refused: malformed, too large, too many"
    " relays, invalid server names, not naming the destination",
    "refused_signature": "Advertisements refused: not signed by the destination",
    "refused_expired": "Advertisements refused: expired",
    "refused_older": "Advertisements refused: older than the one held",
}


class Refusal(enum.Enum):
    INVALID = "invalid"
    SIGNATURE = "signature"
    EXPIRED = "expired"
    OLDER = "older"


class Refused(Exception):
    def __init__(self, kind: Refusal, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def advertisement_of(
    relays: tuple[str, ...], server_name: str, now_ms: int
) -> JsonDict:
    """The (unsigned) advertisement of `server_name`'s relays."""
    return {
        "server_name": server_name,
        "relays": list(relays),
        "ts": now_ms,
        "valid_until_ts": now_ms + ADVERTISEMENT_VALIDITY_MS,
    }


def _timestamp(answer: JsonDict, key: str) -> int:
    value = answer.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise Refused(Refusal.INVALID, f"{key} must be an integer >= 0")


def check_advertisement(
    answer: Any, destination: str, now_ms: int, held: Advertisement | None
) -> Advertisement:
    """The advertisement in `destination`'s answer, if it may be kept (its
    signature aside, which the caller verifies); raises Refused."""
    if not isinstance(answer, dict):
        raise Refused(Refusal.INVALID, "the answer is not a JSON object")
    try:
        size = len(encode_canonical_json(answer))
    except (TypeError, ValueError, UnicodeError) as e:
        raise Refused(Refusal.INVALID, f"not canonical JSON: {e}") from e
    if size > MAX_ADVERTISEMENT_BYTES:
        raise Refused(
            Refusal.INVALID, f"{size} bytes, at most {MAX_ADVERTISEMENT_BYTES}"
        )
    if answer.get("server_name") != destination:
        raise Refused(
            Refusal.INVALID,
            f"it names server {json.dumps(answer.get('server_name'))}",
        )
    relays = answer.get("relays")
    if not isinstance(relays, list):
        raise Refused(Refusal.INVALID, "relays is not a list")
    if len(relays) > MAX_RELAYS:
        raise Refused(Refusal.INVALID, f"{len(relays)} relays, at most {MAX_RELAYS}")
    for relay in relays:
        if not isinstance(relay, str) or not is_valid_server_name(relay):
            raise Refused(Refusal.INVALID, f"{json.dumps(relay)} is not a server name")
    if len(set(relays)) != len(relays):
        raise Refused(Refusal.INVALID, "a relay is listed twice")
    ts, valid_until_ts = _timestamp(answer, "ts"), _timestamp(answer, "valid_until_ts")
    if ts > now_ms + MAX_CLOCK_SKEW_MS:
        raise Refused(Refusal.INVALID, f"ts {ts} is in the future")
    signatures = answer.get("signatures")
    if not isinstance(signatures, dict) or destination not in signatures:
        raise Refused(Refusal.SIGNATURE, f"it is not signed by {destination}")
    if valid_until_ts <= now_ms:
        raise Refused(Refusal.EXPIRED, f"it expired at {valid_until_ts}")
    if held is not None and ts < held.ts:
        raise Refused(
            Refusal.OLDER, f"ts {ts} is older than the {held.ts} of the one held"
        )
    return Advertisement(destination, tuple(relays), ts, valid_until_ts)


class Advertiser:
    """Answers the `synapse_relay.relays` query with our signed relays."""

    def __init__(self, config: ReceiveConfig, api: ModuleApi, stats: RoleStats) -> None:
        self._relays = config.relays
        self._api = api
        self._stats = stats

    def serve(self) -> None:
        serve_query(self._api, RELAYS_QUERY_TYPE, self.on_query)

    async def on_query(self, args: JsonDict) -> JsonDict:
        self._stats.inc("advertisements_served")
        logger.debug("Advertising our relays to %s", args.get("origin"))
        return sign_as_this_server(
            self._api,
            advertisement_of(
                self._relays, self._api.server_name, self._api.get_current_time_msec()
            ),
        )


class Federation(Protocol):
    """What discovery needs of Synapse (`_synapse.discovery.DiscoveryFederation`)."""

    async def query(self, destination: str, query_type: str) -> Any: ...

    async def verify_signed_by(
        self, server_name: str, signed: JsonDict, now_ms: int
    ) -> None: ...


@attr.s(frozen=True, auto_attribs=True)
class FetchOutcome:
    # "kept", "no_module", "failed" or "refused"
    result: str
    reason: str | None = None
    advertisement: Advertisement | None = None

    def to_json(self) -> JsonDict:
        ad = self.advertisement
        return {
            "result": self.result,
            "reason": self.reason,
            "relays": None if ad is None else list(ad.relays),
            "ts": None if ad is None else ad.ts,
            "valid_until_ts": None if ad is None else ad.valid_until_ts,
        }


class Discovery:
    """Learns destinations' relays from their advertisements (the send role)."""

    def __init__(
        self,
        config: SendConfig,
        store: RelayStore,
        federation: Federation,
        api: ModuleApi,
        stats: RoleStats,
        changed: Callable[[], None],
    ) -> None:
        """`changed()` is called when an advertisement was kept."""
        self._config = config
        self._store = store
        self._federation = federation
        self._api = api
        self.stats = stats
        self._changed = changed
        # destination -> when it was last queried (or its copy held fetched), ms
        self._checked: dict[str, int] = {}
        self._in_flight: set[str] = set()

    def delivered(self, destination: str) -> None:
        """`destination` accepted a transaction: fetch its advertisement in the
        background if the copy held is older than the interval. Cheap; never
        raises."""
        if not self._config.discover or destination in self._in_flight:
            return
        last = self._checked.get(destination)
        now = self._api.get_current_time_msec()
        if last is not None and now - last < self._config.discover_interval_ms:
            return
        self._in_flight.add(destination)
        self._api.run_as_background_process(
            "synapse_relay_discover", self._refresh, destination
        )

    async def _refresh(self, destination: str) -> None:
        try:
            if destination not in self._checked:
                # First delivery since start-up: the copy held may be fresh.
                held = await self._store.discovered_for(destination)
                now = self._api.get_current_time_msec()
                if (
                    held is not None
                    and now - held.fetched_ts < self._config.discover_interval_ms
                ):
                    self._checked[destination] = held.fetched_ts
                    return
            self._checked[destination] = self._api.get_current_time_msec()
            await self.fetch(destination)
        except Exception:
            logger.exception("Discovering the relays of %s failed", destination)
        finally:
            self._in_flight.discard(destination)

    async def fetch(self, destination: str) -> FetchOutcome:
        """Ask `destination` for its advertisement now and keep it if it passes."""
        try:
            answer = await self._federation.query(destination, RELAYS_QUERY_TYPE)
        except NoQueryHandler:
            self.stats.inc("no_module")
            logger.debug("%s does not advertise relays (404)", destination)
            return FetchOutcome("no_module")
        except QueryFailed as e:
            self.stats.inc("failed")
            logger.info("Could not fetch the relays of %s: %s", destination, e)
            return FetchOutcome("failed", str(e))
        now = self._api.get_current_time_msec()
        held = await self._store.discovered_for(destination)
        try:
            advertisement = check_advertisement(
                answer, destination, now, None if held is None else held.advertisement
            )
            try:
                await self._federation.verify_signed_by(destination, answer, now)
            except BadSignature as e:
                raise Refused(Refusal.SIGNATURE, str(e)) from e
            kept = await self._store.keep_advertisement(
                advertisement, json.dumps(answer), now
            )
            if not kept:
                raise Refused(Refusal.OLDER, "a newer one was kept meanwhile")
        except Refused as e:
            self.stats.inc(f"refused_{e.kind.value}")
            logger.warning(
                "Refused the relay advertisement of %s (%s): %s",
                destination,
                e.kind.value,
                e.reason,
            )
            return FetchOutcome("refused", f"{e.kind.value}: {e.reason}")
        self.stats.inc("fetched")
        if held is None or held.advertisement.relays != advertisement.relays:
            logger.info(
                "Discovered the relays of %s: %s",
                destination,
                ", ".join(advertisement.relays) or "none",
            )
        self._changed()
        return FetchOutcome("kept", advertisement=advertisement)

    async def forget(self, destination: str) -> bool:
        """Forget the advertisement held for `destination` (it is fetched again
        after the next transaction it accepts); whether one was held."""
        self._checked.pop(destination, None)
        forgotten = await self._store.forget_discovered(destination)
        self._changed()
        return forgotten


def start_discovery(
    receive: ReceiveConfig,
    send: SendConfig,
    store: RelayStore,
    api: ModuleApi,
    changed: Callable[[], None],
) -> Discovery:
    """Advertise our relays on this process, and learn other servers' relays."""
    stats = RoleStats("discovery", DISCOVERY_COUNTERS, per_relay=False)
    Advertiser(receive, api, stats).serve()
    return Discovery(send, store, DiscoveryFederation(api), api, stats, changed)
