"""What the send role knows of reachability, as plain state with the clock passed in:
`Destinations`, each destination's state (unknown, up or down and since when, and
what is scheduled for it), and `RelayHealth`, each relay's retry delay after failed
deposits. The send role's decisions (sender.py, early_deposit.py) read and change it.
"""

import enum
from collections.abc import Sequence

import attr

# After its n-th consecutive failure a relay is skipped for 1 s doubling, at most 30 s.
RELAY_RETRY_BASE_MS = 1_000
RELAY_RETRY_MAX_MS = 30_000


def relay_retry_delay_ms(failures: int) -> int:
    """How long a relay is skipped after `failures` (>= 1) failures in a row."""
    return min(RELAY_RETRY_BASE_MS << min(failures - 1, 16), RELAY_RETRY_MAX_MS)


class Reach(enum.Enum):
    UNKNOWN = "unknown"  # nothing learnt since this process started
    UP = "up"
    DOWN = "down"


@attr.s(auto_attribs=True)
class DestinationState:
    reach: Reach = Reach.UNKNOWN
    # when `reach` last changed, ms
    since_ms: int = 0
    # its answer to the last direct attempt was an error such as 400 or 403: Synapse
    # then backs off from it as without this module
    rejected: bool = False
    probe_scheduled: bool = False
    wake_scheduled: bool = False
    # the direct attempts of a transaction have had no answer for longer than
    # DEPOSIT_AFTER_MS, and have not ended yet: later transactions are deposited
    # at once (and tried directly all the same)
    silent: bool = False
    direct_failures: int = 0
    fallbacks: int = 0


class Destinations:
    """What the send role knows of each destination that has relays."""

    def __init__(self) -> None:
        self._states: dict[str, DestinationState] = {}

    def get(self, destination: str) -> DestinationState:
        state = self._states.get(destination)
        if state is None:
            state = self._states[destination] = DestinationState()
        return state

    def peek(self, destination: str) -> DestinationState | None:
        return self._states.get(destination)

    def is_down(self, destination: str) -> bool:
        state = self._states.get(destination)
        return state is not None and state.reach is Reach.DOWN

    def mark_down(self, destination: str, now_ms: int) -> bool:
        """Whether it was not already down."""
        state = self.get(destination)
        state.rejected = False
        if state.reach is Reach.DOWN:
            return False
        state.reach, state.since_ms = Reach.DOWN, now_ms
        return True

    def mark_up(self, destination: str, now_ms: int) -> bool:
        """Whether it was down."""
        state = self.get(destination)
        state.rejected = False
        was_down = state.reach is Reach.DOWN
        if state.reach is not Reach.UP:
            state.reach, state.since_ms = Reach.UP, now_ms
        return was_down

    def mark_rejected(self, destination: str, now_ms: int) -> None:
        self.mark_up(destination, now_ms)
        self.get(destination).rejected = True

    def forget(self, destination: str) -> None:
        self._states.pop(destination, None)

    def snapshot(self) -> dict[str, object]:
        return {
            destination: {
                "state": state.reach.value,
                "since_ts": state.since_ms or None,
                "direct_failures": state.direct_failures,
                "fallbacks": state.fallbacks,
            }
            for destination, state in sorted(self._states.items())
        }


@attr.s(auto_attribs=True)
class _RelayState:
    failures: int = 0
    retry_at_ms: int = 0


class RelayHealth:
    """Each relay's own retry delay after failed deposits."""

    def __init__(self) -> None:
        self._relays: dict[str, _RelayState] = {}

    def usable(self, relay: str, now_ms: int) -> bool:
        state = self._relays.get(relay)
        return state is None or state.retry_at_ms <= now_ms

    def failed(self, relay: str, now_ms: int) -> int:
        """Record a failure; how long the relay is now skipped for, ms."""
        state = self._relays.setdefault(relay, _RelayState())
        state.failures += 1
        delay = relay_retry_delay_ms(state.failures)
        state.retry_at_ms = now_ms + delay
        return delay

    def succeeded(self, relay: str) -> None:
        self._relays.pop(relay, None)

    def next_usable_ms(self, relays: Sequence[str], now_ms: int) -> int:
        """When the first of `relays` may be tried again (`now_ms` if one may now)."""
        return max(
            now_ms,
            min(
                (self._relays[r].retry_at_ms if r in self._relays else now_ms)
                for r in relays
            ),
        )
