"""Which relays a destination has: the one rule (`choose_relays`: the admin API's,
else `send.relays`, else the destination's advertisement while it is valid), and
`RelayDirectory`, which applies it to what the database and the configuration
hold, with a short cache so that the federation sender does not query the database
for every transaction. Everything that needs a destination's relays (the send role,
the admin API, key deposits and fallback) asks `RelayDirectory`
(`resolve`, `relays_for`, `everything`).
"""

import enum
import logging
from collections.abc import Callable, Mapping, Sequence

import attr

from synapse_relay.config import SendConfig
from synapse_relay.store import Discovered, RelayStore

logger = logging.getLogger(__name__)

# How long relays set through the admin API may be cached: a change made on another
# worker is seen within this time (one on this process at once).
MAPPING_CACHE_MS = 5_000


def usable_relays(
    destination: str, relays: Sequence[str], own_server_name: str
) -> tuple[str, ...]:
    """`relays` without duplicates, the destination itself or this server."""
    result: list[str] = []
    for relay in relays:
        if relay not in (destination, own_server_name) and relay not in result:
            result.append(relay)
    return tuple(result)


class Source(enum.Enum):
    """Where the relays of a destination come from, in order of precedence."""

    ADMIN = "admin"  # set through the admin API (database)
    CONFIG = "config"  # send.relays
    DISCOVERED = "discovered"  # the destination's advertisement (discovery.py)
    NONE = "none"


@attr.s(frozen=True, auto_attribs=True)
class RelaysOfDestination:
    """What relays a destination has, and where that comes from."""

    destination: str
    # the relays used, without the destination itself or this server
    relays: tuple[str, ...]
    source: Source
    config_relays: tuple[str, ...]
    # the destination's advertisement held, whether it is used or not
    discovered: Discovered | None


def choose_relays(
    destination: str,
    config: SendConfig,
    admin: tuple[str, ...] | None,
    discovered: Discovered | None,
    now_ms: int,
    own_server_name: str,
) -> RelaysOfDestination:
    """The one rule: the admin API's relays of `destination`, else `send.relays`,
    else (with `send.discover`) those of its advertisement while it is valid."""
    config_relays = tuple(config.relays.get(destination, ()))
    relays: Sequence[str]
    if admin is not None:
        relays, source = admin, Source.ADMIN
    elif destination in config.relays:
        relays, source = config_relays, Source.CONFIG
    elif (
        config.discover
        and discovered is not None
        and discovered.advertisement.valid_until_ts > now_ms
    ):
        relays, source = discovered.advertisement.relays, Source.DISCOVERED
    else:
        relays, source = (), Source.NONE
    return RelaysOfDestination(
        destination,
        usable_relays(destination, relays, own_server_name),
        source,
        config_relays,
        discovered,
    )


class RelayDirectory:
    """The relays of each destination (`choose_relays`), from the admin API's and
    the discovered ones in the database, and the configuration.

    The database is read at most once per `MAPPING_CACHE_MS` (one query for all
    destinations of each kind), so that a change made on any worker reaches the
    federation sender within that time; `invalidate` makes a change made on this
    process count at once, and `resolve(..., fresh=True)` reads the database now.
    """

    def __init__(
        self,
        config: SendConfig,
        store: RelayStore,
        clock_ms: Callable[[], int],
        own_server_name: str,
    ) -> None:
        self._config = config
        self._store = store
        self._clock_ms = clock_ms
        self._own_server_name = own_server_name
        self._admin: Mapping[str, tuple[str, ...]] | None = None
        self._discovered: Mapping[str, Discovered] = {}
        self._loaded_ms: int | None = None
        # Bumped by each invalidation: a read that began before one is stale and
        # must not be cached (it may predate the change that invalidated).
        self._generation = 0

    def invalidate(self) -> None:
        self._loaded_ms = None
        self._generation += 1

    async def relays_for(self, destination: str) -> tuple[str, ...]:
        return (await self.resolve(destination)).relays

    async def resolve(
        self, destination: str, fresh: bool = False
    ) -> RelaysOfDestination:
        if fresh:
            admin = await self._store.send_relays_for(destination)
            discovered = await self._store.discovered_for(destination)
        else:
            admin_relays, discovered_relays = await self._mappings()
            admin = admin_relays.get(destination)
            discovered = discovered_relays.get(destination)
        return choose_relays(
            destination,
            self._config,
            admin,
            discovered,
            self._clock_ms(),
            self._own_server_name,
        )

    async def everything(self) -> list[RelaysOfDestination]:
        """Every destination that has relays from any source or an advertisement
        held, read from the database now, sorted by destination."""
        admin = await self._store.send_relays()
        discovered = await self._store.discovered()
        now = self._clock_ms()
        return [
            choose_relays(
                destination,
                self._config,
                admin.get(destination),
                discovered.get(destination),
                now,
                self._own_server_name,
            )
            for destination in sorted({*admin, *self._config.relays, *discovered})
        ]

    async def _mappings(
        self,
    ) -> tuple[Mapping[str, tuple[str, ...]], Mapping[str, Discovered]]:
        now = self._clock_ms()
        generation = self._generation
        if self._admin is not None and self._loaded_ms is not None:
            if now - self._loaded_ms < MAPPING_CACHE_MS:
                return self._admin, self._discovered
            # Expired (not invalidated): callers meanwhile keep using the
            # mappings loaded before.
            self._loaded_ms = now
        try:
            admin = await self._store.send_relays()
            discovered = await self._store.discovered() if self._config.discover else {}
        except Exception as e:
            logger.warning(
                "Could not read the relays set through the admin API or discovered"
                " (%s): using %s",
                e,
                "the ones read before" if self._admin is not None else "the config",
            )
            return (self._admin or {}), self._discovered
        if generation == self._generation:
            self._admin, self._discovered, self._loaded_ms = admin, discovered, now
        return admin, discovered
