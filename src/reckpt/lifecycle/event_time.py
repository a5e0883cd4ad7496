"""Event-time save triggers: checkpoint by the time of the data consumed (TorchEasyRec §6.1).

A job reading a stream (Kafka) saves when the *event time* of its data crosses a boundary:
an interval aligned to the Unix epoch (``ts_interval_s=3600``: every full hour of data) or
an absolute target (``ts_targets=[1717200000]``). Ranks read different partitions, so their
event times differ; a step's time is the one a ``ts_quorum`` fraction of ranks has reached
(:func:`reckpt.policy.quorum_event_time`).

The reference (the event time of the last save, ``__data_ts_watermark__`` in the saved
dataloader state) starts unset: the first reconciled time only sets it and never saves, so
a job does not save on its first batch; a resumed job seeds it from the checkpoint.

Call sequence, inside :meth:`reckpt.CheckpointManager.maybe_save`, once per step:

1. (all ranks) :meth:`EventTimeTrigger.reconcile`: gather every rank's time on a dedicated
   gloo group, then the quorum time; identical on every rank.
2. (all ranks) :meth:`EventTimeTrigger.fires` with that time.
3. (all ranks) :meth:`EventTimeTrigger.saved` after a save, which advances the reference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, overload

from reckpt.dist import Dist
from reckpt.errors import ConfigError
from reckpt.format.dataloader_state import DATA_TS_WATERMARK
from reckpt.policy import quorum_event_time, should_save_on_timestamp

__all__ = ["EventTimeTrigger", "stamp_watermark"]


@overload
def stamp_watermark(state: Mapping[str, Any], ts: float | None) -> dict[str, Any]: ...
@overload
def stamp_watermark(state: None, ts: float | None) -> None: ...
@overload
def stamp_watermark(state: Mapping[str, Any] | None, ts: float | None) -> dict[str, Any] | None: ...
def stamp_watermark(state: Mapping[str, Any] | None, ts: float | None) -> dict[str, Any] | None:
    """A copy of ``state`` carrying the watermark ``ts`` (the caller's dict is never changed)."""
    if state is None:
        return None
    out = dict(state)
    if ts is not None:
        out[DATA_TS_WATERMARK] = ts
    return out


class EventTimeTrigger:
    """The event-time trigger of one manager: its settings and the reference time.

    All triggers are off until :meth:`configure` turns one on; then :meth:`reconcile` is a
    collective every rank must call at every step.
    """

    def __init__(self) -> None:
        self.interval_s: float = 0
        self.targets: tuple[float, ...] = ()
        self.quorum = 0.5
        self.last: float | None = None  # event time of the last save; None: not seen yet
        self._group: Any = None

    @property
    def enabled(self) -> bool:
        """Whether an interval or a target is set (ranks must then pass their event times)."""
        return self.interval_s > 0 or len(self.targets) > 0

    def configure(
        self, interval_s: float, targets: Sequence[float], quorum: float, process_group: Any = None
    ) -> None:
        """Collective when a trigger is on under a process group: set the triggers.

        Leaves the reference alone, so a watermark seeded by a restore survives. The first
        call that turns a trigger on creates the gloo group the per-step gather uses (the
        training group may be NCCL, and these are host values), so every rank must call it.

        Raises:
            ConfigError: ``interval_s`` is negative, a target is not finite, or a trigger is
                on and ``quorum`` is not in (0, 1].
        """
        if interval_s < 0:
            raise ConfigError(f"ts_interval_s must be >= 0 (0 turns it off), got {interval_s}")
        if not all(math.isfinite(t) for t in targets):
            raise ConfigError(f"ts_targets must be finite Unix times in seconds, got {list(targets)}")
        if (interval_s > 0 or targets) and not 0.0 < quorum <= 1.0:
            raise ConfigError(
                f"ts_quorum must be in (0, 1] when ts_interval_s or ts_targets is set, got {quorum};"
                " pass the fraction of ranks whose data must reach a boundary, e.g. 0.5"
            )
        self.interval_s, self.targets, self.quorum = interval_s, tuple(targets), quorum
        d = Dist(process_group)
        if self.enabled and d.active and self._group is None:
            import torch.distributed as torch_dist

            ranks = None if process_group is None else torch_dist.get_process_group_ranks(process_group)
            self._group = torch_dist.new_group(ranks=ranks, backend="gloo")

    def reconcile(self, data_timestamp: float) -> float | None:
        """Collective when enabled: the event time a quorum of ranks has reached.

        Every rank passes its own time (``-1.0`` when its data carried none; it counts as
        "not there yet"). Returns ``None`` when the triggers are off or too few ranks have a
        time; otherwise the same value on every rank.
        """
        if not self.enabled:
            return None
        times = Dist(self._group).all_gather(float(data_timestamp))
        ts = quorum_event_time(times, self.quorum)
        return ts if ts is not None and ts >= 0 else None

    def fires(self, ts: float | None) -> bool:
        """Whether ``ts`` crossed a boundary since the last save; the first time only sets it."""
        if ts is None:
            return False
        if self.last is None:
            self.last = ts
            return False
        return should_save_on_timestamp(ts, self.last, self.interval_s, self.targets)

    def saved(self, ts: float | None) -> None:
        """A checkpoint was saved at event time ``ts``: it becomes the reference."""
        if ts is not None:
            self.last = ts

    def seed(self, state: Mapping[str, Any] | None) -> None:
        """Take the reference from a restored dataloader state (unset when it has none)."""
        if state is not None:
            wm = state.get(DATA_TS_WATERMARK)
            self.last = float(wm) if isinstance(wm, int | float) and not isinstance(wm, bool) else None
