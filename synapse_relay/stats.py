"""Counters of each role, served by the admin `status` API and to Prometheus.

Each counter `name` of role `role` is the Prometheus counter
`synapse_relay_<role>_<name>_total`, labelled by `relay` for the send and receive
roles (whose relays come from configuration, so the label set stays small). Counts
are per process: in a worker deployment each worker reports its own.
"""

from collections import defaultdict
from collections.abc import Sequence

from prometheus_client import Counter

_METRICS: dict[str, Counter] = {}


def _metric(name: str, documentation: str, labelnames: Sequence[str]) -> Counter:
    """One Prometheus counter per name for the process, however many modules."""
    if name not in _METRICS:
        _METRICS[name] = Counter(name, documentation, labelnames)
    return _METRICS[name]


class RoleStats:
    def __init__(self, role: str, names: dict[str, str], per_relay: bool) -> None:
        """`names` maps each counter's name to its one-line description."""
        self._per_relay = per_relay
        self._totals = dict.fromkeys(names, 0)
        self._by_relay: defaultdict[str, dict[str, int]] = defaultdict(
            lambda: dict.fromkeys(names, 0)
        )
        self._metrics = {
            name: _metric(
                f"synapse_relay_{role}_{name}_total",
                description,
                ("relay",) if per_relay else (),
            )
            for name, description in names.items()
        }

    def inc(self, name: str, relay: str | None = None, amount: int = 1) -> None:
        self._totals[name] += amount
        metric = self._metrics[name]
        if self._per_relay:
            assert relay is not None, f"{name} is counted per relay"
            self._by_relay[relay][name] += amount
            metric.labels(relay=relay).inc(amount)
        else:
            metric.inc(amount)

    def snapshot(self) -> dict[str, object]:
        result: dict[str, object] = dict(self._totals)
        if self._per_relay:
            result["relays"] = {relay: dict(c) for relay, c in self._by_relay.items()}
        return result


class KindCounts:
    """Counts by kind and outcome (EDUs by type, processed or dropped), as the
    Prometheus counter `name` labelled by `kind_label` and `outcome`; callers
    bound the kinds (the label set must stay small)."""

    def __init__(self, name: str, documentation: str, kind_label: str) -> None:
        self._kind_label = kind_label
        self._counts: defaultdict[str, dict[str, int]] = defaultdict(dict)
        self._metric = _metric(name, documentation, (kind_label, "outcome"))

    def inc(self, kind: str, outcome: str, amount: int = 1) -> None:
        counts = self._counts[outcome]
        counts[kind] = counts.get(kind, 0) + amount
        self._metric.labels(**{self._kind_label: kind, "outcome": outcome}).inc(amount)

    def snapshot(self) -> dict[str, dict[str, int]]:
        """outcome -> kind -> count."""
        return {outcome: dict(counts) for outcome, counts in self._counts.items()}
