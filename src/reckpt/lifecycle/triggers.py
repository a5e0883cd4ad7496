"""When :meth:`reckpt.CheckpointManager.maybe_save` saves: its triggers, decided identically on every rank.

:class:`SaveTriggers` combines the pure save decision (:func:`reckpt.policy.should_save`:
steps, epochs, wall-clock interval, the final save) with the event-time trigger
(:mod:`reckpt.lifecycle.event_time`). Where a decision could differ between ranks, it is
made the same everywhere: rank 0's wall clock decides the interval trigger (a broadcast),
and event times are reconciled over every rank before the event-time trigger is asked.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from reckpt.dist import Dist
from reckpt.lifecycle.event_time import EventTimeTrigger, stamp_watermark
from reckpt.policy import SaveDecision, should_save

__all__ = ["SaveTriggers"]


class SaveTriggers:
    """The save triggers of one manager, and the times they measure from.

    Args:
        process_group: the training process group (``None``: the default group, if any).

    Attributes:
        event_time: the event-time trigger (its reference is seeded by restores).
        last_save_time: wall-clock time of the last save (``None``: none yet; the interval
            then counts from the manager's creation).
    """

    def __init__(self, process_group: Any) -> None:
        self._pg = process_group
        self.event_time = EventTimeTrigger()
        self.decision = SaveDecision()
        self.started = time.time()
        self.last_save_time: float | None = None

    def configure(
        self,
        save_steps: int,
        save_epochs: int,
        ts_interval_s: float,
        ts_targets: Sequence[float],
        ts_quorum: float,
        *,
        save_interval_s: float,
    ) -> None:
        """Set the triggers; collective when an event-time one is on.

        The arguments are :meth:`reckpt.CheckpointManager.set_save_policy`'s, which documents them.
        """
        decision = SaveDecision(
            save_steps=save_steps, save_epochs=save_epochs, save_interval_s=save_interval_s
        )
        self.event_time.configure(ts_interval_s, ts_targets, ts_quorum, self._pg)
        self.decision = decision

    def check(
        self,
        step: int,
        epoch: int | None,
        final: bool,
        data_timestamp: float,
        dataloader_state: Mapping[str, Any] | None,
    ) -> tuple[bool, float | None, dict[str, Any] | None]:
        """Collective: whether a trigger fires at ``step``; the same answer on every rank.

        Every rank passes its own event time (``-1.0``: none) and dataloader state. Returns
        ``(fires, the quorum event time, a copy of the state stamped with it)``. The first
        quorum time only sets the event-time reference: it never fires.
        """
        data_ts = self.event_time.reconcile(data_timestamp)
        state = stamp_watermark(dataloader_state, data_ts)
        want = should_save(
            self.decision,
            step=step,
            epoch=epoch,
            final=final,
            now=time.time(),
            last_save_time=self.last_save_time or self.started,
        )
        if self.decision.save_interval_s > 0:
            want = bool(Dist(self._pg).broadcast(want))  # wall clocks differ: rank 0 decides
        want = self.event_time.fires(data_ts) or want  # first: the first time seeds the reference
        return want, data_ts, state
