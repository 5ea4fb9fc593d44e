"""The early deposit of one transaction (`Race`): while the direct attempts of a
transaction to a destination not known to be down go on without an answer, it is
deposited on the destination's relays as well, and the first of the two to take it
decides what Synapse is told (sender.py, step 1 of `Sender.send`).
"""

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, cast

import attr
from synapse.module_api import JsonDict, ModuleApi, make_deferred_yieldable
from twisted.internet import defer

from synapse_relay._synapse import fire_in_sentinel_context
from synapse_relay._synapse.outbound import BackedOff, OutgoingTransaction, Unreachable
from synapse_relay.reach import DestinationState
from synapse_relay.stats import RoleStats

logger = logging.getLogger(__name__)

# How long the direct attempts of a transaction may stay without any answer before
# it is deposited on the relays as well (the attempts go on): bounds the first
# message to a silent destination to about this plus one deposit, instead of
# attempts_before_relay x DIRECT_TIMEOUT_MS. A live server answers a transaction
# well within it (tens of ms), except under heavy load, when the copy on the relays
# is a harmless duplicate.
DEPOSIT_AFTER_MS = 1_000

# What TransactionManager takes as "the destination accepted it all".
SENT_TO_RELAY: JsonDict = {"pdus": {}}


@attr.s(frozen=True, auto_attribs=True)
class Decision:
    """How a transaction ended for Synapse: sent (`response`), an exception of
    Synapse's to raise again (`error`), or taken by nobody (neither)."""

    response: JsonDict | None = None
    error: Exception | None = None
    direct_failure: Unreachable | None = None


class _Timer(Protocol):
    """The IDelayedCall that `delayed_background_call` returns (a zope interface,
    which mypy cannot check without a plugin)."""

    def active(self) -> bool: ...

    def cancel(self) -> None: ...


class Race:
    """One transaction to a destination not known to be down: its direct attempts
    and, when they failed or had no answer for `DEPOSIT_AFTER_MS`, its deposits,
    in parallel. The first to take it decides; the other goes on in the
    background (its outcome still updates what we know of the destination and
    the relays). Duplicates are harmless: same transaction id, same events.

    Each event (`_direct_ended`, `_deadline`, `_deposit_ended`) runs in its own
    background process; the decision is fired in the sentinel logcontext.
    """

    def __init__(
        self,
        api: ModuleApi,
        stats: RoleStats,
        txn: OutgoingTransaction,
        state: DestinationState,
        *,
        direct: Callable[[], Awaitable[JsonDict | Exception]],
        deposit: Callable[[], Awaitable[bool]],
    ) -> None:
        self._api = api
        self._stats = stats
        self._txn = txn
        self._state = state
        self._direct_attempts = direct
        self._deposit = deposit
        self._decided: defer.Deferred[Decision] = defer.Deferred()
        # the direct attempts' outcome: an answer, an exception, or None (pending)
        self._direct: JsonDict | Exception | None = None
        # deposits: not started (None), under way, or ended (whether one accepted)
        self._depositing = False
        self._deposited: bool | None = None
        self._timer: _Timer | None = None

    async def run(self) -> Decision:
        self._api.run_as_background_process(
            "synapse_relay_direct", self._direct_attempts
        ).addBoth(self._direct_ended)
        if not self._decided.called and not self._depositing:
            if self._state.silent:
                # An earlier transaction's attempts have had no answer for longer
                # than the deadline: no need to wait for this one's.
                self._deposit_early("its earlier transaction got no answer either")
            else:
                self._timer = cast(
                    _Timer,
                    self._api.delayed_background_call(
                        DEPOSIT_AFTER_MS,
                        self._deadline,
                        desc="synapse_relay_deposit_after",
                    ),
                )
        return await make_deferred_yieldable(self._decided)

    def _decide(self, decision: Decision) -> None:
        if self._decided.called:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        fire_in_sentinel_context([self._decided], decision)

    def _direct_ended(self, outcome: JsonDict | Exception | None) -> None:
        if outcome is None:  # cannot happen: `direct` never raises
            outcome = RuntimeError("the direct attempts ended without an outcome")
        self._direct = outcome
        self._state.silent = False
        if isinstance(outcome, dict):
            self._decide(Decision(response=outcome))
        elif not isinstance(outcome, (Unreachable, BackedOff)):
            # the destination spoke (400, 403...), or a whitelist denial
            self._decide(Decision(error=outcome))
        elif not self._depositing:
            self._start_deposits()
        elif self._deposited is False:
            self._decide(Decision(direct_failure=self._direct_failure()))

    def _deadline(self) -> None:
        self._timer = None
        if self._decided.called or self._depositing:
            return
        self._state.silent = True
        self._deposit_early(f"no answer within {DEPOSIT_AFTER_MS} ms")

    def _deposit_early(self, why: str) -> None:
        self._stats.inc("early_deposits")
        logger.info(
            "Depositing transaction %s for %s on its relays while the direct"
            " attempts go on: %s",
            self._txn.transaction_id,
            self._txn.destination,
            why,
        )
        self._start_deposits()

    def _start_deposits(self) -> None:
        self._depositing = True
        self._api.run_as_background_process(
            "synapse_relay_deposits", self._deposit
        ).addBoth(self._deposit_ended)

    def _deposit_ended(self, accepted: bool | None) -> None:
        self._deposited = bool(accepted)
        if accepted:
            self._decide(Decision(response=SENT_TO_RELAY))
        elif self._direct is not None:
            # the direct attempts failed too
            self._decide(Decision(direct_failure=self._direct_failure()))

    def _direct_failure(self) -> Unreachable | None:
        return self._direct if isinstance(self._direct, Unreachable) else None
