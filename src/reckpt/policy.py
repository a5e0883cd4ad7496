"""Retention and save-decision policies (pure: no I/O, no clock, no torch.distributed).

Policies work on plain :class:`CheckpointInfo` records and an explicit ``now``. A retention
policy answers "which steps do I keep?"; the kept set is the union over all policies, plus
what must never be deleted (see :func:`steps_to_delete`).

=====================================  =========================================
policy                                 keeps
=====================================  =========================================
``LatestN(3)``                         the 3 newest committed steps
``BestN(2, "auc")``                    the 2 best by ``auc`` (larger is better)
``BestN(1, "logloss", False)``         the lowest ``logloss``
``EveryNSteps(1000)``                  steps divisible by 1000
``EveryNSeconds(3600)``                the first checkpoint of every hour
``PinnedSteps({0, 5000})``             exactly these steps
=====================================  =========================================

Whatever the policies, no prune deletes the best checkpoint while it is known
(:class:`reckpt.best.BestRule`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from reckpt.best import (
    BestRule,
    best_step,
    default_larger_is_better,
    find_best,
    is_finite_number,
    resolve_metric_name,
)
from reckpt.errors import ConfigError

__all__ = [
    "CheckpointInfo",
    "RetentionPolicy",
    "LatestN",
    "BestN",
    "EveryNSteps",
    "EveryNSeconds",
    "PinnedSteps",
    "steps_to_delete",
    "BestRule",
    "find_best",
    "default_larger_is_better",
    "best_step",
    "resolve_metric_name",
    "SaveDecision",
    "should_save",
    "should_save_on_timestamp",
    "quorum_event_time",
    "IncrementalPolicy",
    "next_save_kind",
]


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """What discovery knows about one checkpoint.

    Attributes:
        step: the step in its name.
        path: its directory.
        state: ``committed``, ``legacy``, ``incomplete`` or ``damaged`` (committed, but failed
            verification: see :mod:`reckpt.format.damage`).
        created_at: Unix seconds (manifest time), ``None`` when unknown (legacy).
        size: bytes on storage, ``None`` when not computed.
        metrics: eval metrics (sidecar, else eval-results file), empty when none.
        kind: ``"full"`` (``model.ckpt-<step>``) or ``"delta"`` (``model.delta-<step>``).
        needs: steps of the links a delta restores on top of (its base first).
    """

    step: int
    path: str
    state: str = "committed"
    created_at: float | None = None
    size: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    kind: str = "full"
    needs: tuple[int, ...] = ()

    @property
    def committed(self) -> bool:
        return self.state in ("committed", "legacy")


@runtime_checkable
class RetentionPolicy(Protocol):
    """``keep(checkpoints, now) -> steps to keep`` over committed checkpoints only."""

    def keep(self, checkpoints: Sequence[CheckpointInfo], now: float) -> set[int]: ...


def _committed(cks: Iterable[CheckpointInfo]) -> list[CheckpointInfo]:
    return sorted((c for c in cks if c.committed), key=lambda c: c.step)


@dataclass(frozen=True, slots=True)
class LatestN:
    """Keep the ``n`` newest committed checkpoints (by step, never by string order)."""

    n: int

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"LatestN.n must be >= 1, got {self.n}")

    def keep(self, checkpoints: Sequence[CheckpointInfo], now: float) -> set[int]:
        return {c.step for c in _committed(checkpoints)[-self.n :]}


@dataclass(frozen=True, slots=True)
class BestN:
    """Keep the ``n`` best committed checkpoints by ``metric``; ties go to the older step.

    ``larger_is_better`` unset: the metric's built-in direction (losses smaller, AUC larger;
    :func:`default_larger_is_better`); a metric without one must be given a direction.
    """

    n: int
    metric: str
    larger_is_better: bool | None = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"BestN.n must be >= 1, got {self.n}")
        if self.larger_is_better is None:
            default_larger_is_better(self.metric)  # raises for a metric of unknown direction

    def keep(self, checkpoints: Sequence[CheckpointInfo], now: float) -> set[int]:
        scored = [c for c in _committed(checkpoints) if is_finite_number(c.metrics.get(self.metric))]
        larger = (
            default_larger_is_better(self.metric) if self.larger_is_better is None else self.larger_is_better
        )
        sign = -1.0 if larger else 1.0
        scored.sort(key=lambda c: (sign * float(c.metrics[self.metric]), c.step))
        return {c.step for c in scored[: self.n]}


@dataclass(frozen=True, slots=True)
class EveryNSteps:
    """Keep every committed step divisible by ``n``."""

    n: int

    def keep(self, checkpoints: Sequence[CheckpointInfo], now: float) -> set[int]:
        return {c.step for c in _committed(checkpoints) if self.n > 0 and c.step % self.n == 0}


@dataclass(frozen=True, slots=True)
class EveryNSeconds:
    """Keep the first committed checkpoint of each ``seconds``-long window (by creation time)."""

    seconds: float

    def keep(self, checkpoints: Sequence[CheckpointInfo], now: float) -> set[int]:
        kept: set[int] = set()
        seen: set[int] = set()
        for c in _committed(checkpoints):
            if c.created_at is None or self.seconds <= 0:
                continue
            window = int(c.created_at // self.seconds)
            if window not in seen:
                seen.add(window)
                kept.add(c.step)
        return kept


@dataclass(frozen=True, slots=True)
class PinnedSteps:
    """Keep exactly these steps."""

    steps: frozenset[int]

    def keep(self, checkpoints: Sequence[CheckpointInfo], now: float) -> set[int]:
        return {c.step for c in checkpoints if c.step in self.steps}


def steps_to_delete(
    checkpoints: Sequence[CheckpointInfo],
    policies: Sequence[RetentionPolicy],
    *,
    now: float,
    protected: Iterable[int] = (),
    best: BestRule | None = None,
) -> list[int]:
    """Committed steps no policy keeps and nothing protects, ascending.

    Never deleted, whatever the policies: the newest committed checkpoint, the best one by
    ``best`` (default ``BestRule()``: the only metric recorded, else ``auc``; see
    :func:`find_best`), every link a kept delta checkpoint needs (its base and earlier
    deltas), every step in ``protected`` (the save in flight, leased steps), and uncommitted
    directories (crash debris is the commit protocol's to clean). With no policy at all
    nothing is deleted. Damaged checkpoints (``state == "damaged"``: they failed
    verification) count toward no policy and are deleted unless protected, so a damaged
    checkpoint never outlives a good one.

    Raises:
        ValueError: ``best.required`` and the best cannot be told (nothing may be deleted).

    Example:
        >>> cks = [CheckpointInfo(s, f"m/model.ckpt-{s}", metrics={"auc": a})
        ...        for s, a in ((10, 0.7), (20, 0.6), (30, 0.5))]
        >>> steps_to_delete(cks, [LatestN(1)], now=0.0)
        [20]
    """
    if not policies:
        return []
    damaged = [c.step for c in checkpoints if c.state == "damaged" and c.step not in set(protected)]
    committed = _committed(checkpoints)
    if not committed:
        return sorted(damaged)
    keep = {committed[-1].step, *protected}
    found = find_best({c.step: c.metrics for c in committed}, best or BestRule())
    if found is not None:
        keep.add(found[0])
    for policy in policies:
        keep |= policy.keep(committed, now)
    for c in committed:  # a kept delta keeps its whole chain
        if c.step in keep:
            keep |= set(c.needs)
    return sorted([c.step for c in committed if c.step not in keep] + damaged)


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveDecision:
    """When a :class:`~reckpt.lifecycle.manager.CheckpointManager` saves (all triggers off by default).

    Attributes:
        save_steps: save when ``step > 0 and step % save_steps == 0`` (0 = off).
        save_epochs: save at the end of epoch ``e`` when ``(e + 1) % save_epochs == 0`` (0 = off).
        save_interval_s: save when this many wall-clock seconds passed since the last save (0 = off).
    """

    save_steps: int = 0
    save_epochs: int = 0
    save_interval_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("save_steps", "save_epochs", "save_interval_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def should_save(
    policy: SaveDecision,
    *,
    step: int,
    epoch: int | None,
    final: bool,
    now: float,
    last_save_time: float | None,
) -> bool:
    """Whether any trigger fires (the caller deduplicates saves of one step).

    ========================================================  ======
    case                                                      save
    ========================================================  ======
    ``final=True``                                            yes
    ``save_steps=10``, step 10 / step 5 / step 0              yes / no / no
    ``save_epochs=2``, epoch 1 (end of 2nd) / epoch 0         yes / no
    ``save_interval_s=60``, 61 s / 30 s since the last save    yes / no
    ========================================================  ======
    """
    if final:
        return True
    if policy.save_steps > 0 and step > 0 and step % policy.save_steps == 0:
        return True
    if policy.save_epochs > 0 and epoch is not None and step > 0 and (epoch + 1) % policy.save_epochs == 0:
        return True
    return (
        policy.save_interval_s > 0
        and last_save_time is not None
        and now - last_save_time >= policy.save_interval_s
    )


def should_save_on_timestamp(
    ts: float, last: float | None, interval: float, targets: Sequence[float]
) -> bool:
    """TorchEasyRec's event-time trigger: whether event time ``ts`` crossed a boundary since ``last``.

    A boundary is a multiple of ``interval`` seconds since the Unix epoch (0: none) or a
    target in ``(last, ts]``. ``last is None`` (no reference yet) never fires.

    ========  ========  ==========  ===========  =====
    ts        last      interval    targets      fires
    ========  ========  ==========  ===========  =====
    1000      None      600         (500,)       no
    3600      3599      3600        ()           yes
    3500      3000      3600        ()           no
    1500      1000      0           (1500,)      yes
    2000      1500      0           (1500,)      no
    1600      1000      3600        (1500,)      yes
    ========  ========  ==========  ===========  =====
    """
    if last is None:
        return False
    if interval > 0 and ts // interval > last // interval:
        return True
    return any(last < t <= ts for t in targets)


def quorum_event_time(values: Sequence[float], q: float) -> float | None:
    """The largest event time at least a fraction ``q`` of the ranks has reached.

    With ``m`` values that is the ``k``-th largest, ``k = ceil(q * m)`` (clamped to
    ``[1, m]``): ``q = 1`` gives the minimum, ``q`` near 0 the maximum, 0.5 a median that
    one far-off value cannot move. A rank without a time passes ``-1``, which counts as
    "not there yet"; the result is negative when too few ranks have one.

    ======================  =====  ======
    values                  q      result
    ======================  =====  ======
    ``[]``                  0.5    None
    ``[10, 20, 30, 40]``    1.0    10
    ``[10, 20, 30, 40]``    0.5    30
    ``[100, 101, 1e18]``    0.5    101
    ``[100, 101, -1]``      0.5    100
    ``[100, -1, -1]``       0.5    -1
    ======================  =====  ======
    """
    if not values:
        return None
    ordered = sorted(values)
    m = len(ordered)
    k = min(max(math.ceil(q * m - 1e-9), 1), m)  # the epsilon: 0.28 * 25 is 7.000000000000001
    return ordered[m - k]


@dataclass(frozen=True, slots=True)
class IncrementalPolicy:
    """When a save writes a delta checkpoint instead of a full one.

    Attributes:
        full_every: a full checkpoint after this many deltas in a row.
        max_delta_fraction: a full checkpoint when a delta would exceed this fraction of a
            full one (estimated from the touched rows before anything is written). Default
            0.2: a full save runs at the disk's speed, a delta pays for gathering scattered
            rows, and past about a fifth of the bytes the delta stops being the faster one
            (``benchmarks/results/delta.md``: 1.8x faster at 11% of the bytes, slower at 27%).
        encoding: the weight rows' encoding: ``"raw"`` (lossless, for resuming), ``"int8"``
            or ``"fp16"`` (serving dumps; restore needs ``allow_lossy``).
        tables: state-dict keys of the tables to track (default: every sharded TorchRec
            table, see :class:`reckpt.delta.RowTracker`).
    """

    full_every: int = 4
    max_delta_fraction: float = 0.2
    encoding: str = "raw"
    tables: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.full_every < 1:
            raise ConfigError(f"IncrementalPolicy.full_every must be >= 1, got {self.full_every}")
        if not 0 < self.max_delta_fraction <= 1:
            raise ConfigError(
                f"IncrementalPolicy.max_delta_fraction must be in (0, 1], got {self.max_delta_fraction}"
            )


def next_save_kind(
    policy: IncrementalPolicy,
    *,
    has_parent: bool,
    deltas_since_full: int,
    delta_bytes: int,
    full_bytes: int,
) -> tuple[str, str]:
    """``("full" | "delta", why)`` for the next save.

    Example:
        >>> next_save_kind(IncrementalPolicy(), has_parent=True, deltas_since_full=0,
        ...                delta_bytes=5, full_bytes=100)
        ('delta', '5 of 100 bytes')
    """
    if not has_parent:
        return "full", "no full checkpoint to build on yet"
    if deltas_since_full >= policy.full_every:
        return "full", f"{deltas_since_full} deltas since the last full checkpoint"
    if delta_bytes > policy.max_delta_fraction * full_bytes:
        return "full", f"a delta would be {delta_bytes} of {full_bytes} bytes"
    return "delta", f"{delta_bytes} of {full_bytes} bytes"
