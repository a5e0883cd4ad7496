"""Which rows of which file each rank reads in a data pass, and what a saved position leaves.

A pass over the training files is divided into *pieces*: row ranges ``[start, end)`` of one
file, read in order. Every rank computes every rank's pieces from the same inputs (the files'
row counts, the saved position, the number of processes), so the ranks agree on the division
and on the number of steps in the pass without talking to each other.

Two divisions exist:

* **by file** (a pass that starts fresh, or a resume on the number of processes that wrote the
  position): rank ``r`` of ``W`` reads rows ``[r*n//W, (r+1)*n//W)`` of every file of ``n``
  rows, in file order. Nothing is dropped; ranks differ by at most one row per file.
* **re-divided** (a resume on another number of processes, or a position this division does
  not describe): the rows nobody consumed yet, in file order, are cut into ``M`` contiguous
  runs of equal size (to one row), one per rank.

A position (``dataloader_state.json``, TorchEasyRec's shape) maps ``"<file>:<range start>"`` to
the last consumed row of the range that starts there; a rank consumes each of its ranges from
the start, in order, so the key says rows ``[range start, value]`` are consumed. The union of
those row ranges is the *consumed set*; a resume reads exactly the rows outside it, which is
why any division of the rest keeps every row read exactly once per pass.
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from reckpt.errors import ConfigError
from reckpt.format.dataloader_state import DATA_WORLD_SIZE, EPOCHS_COMPLETED

__all__ = [
    "Piece",
    "Layout",
    "Consumed",
    "read_position",
    "by_file_ranges",
    "plan_pass",
]

Interval = tuple[int, int]
"""Rows ``[start, end)`` of one file."""


@dataclass(frozen=True, slots=True)
class Piece:
    """Rows ``[start, end)`` of ``files[file]``, reported under the position key of ``key_start``.

    ``key_start`` is the start of the range the piece belongs to: a resumed range keeps the key
    it had, so a same-size resume writes the same position keys as an uninterrupted run.
    """

    file: int
    key_start: int
    start: int
    end: int

    @property
    def rows(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Consumed:
    """A saved position, parsed: per file, the consumed rows as sorted disjoint intervals."""

    intervals: tuple[tuple[Interval, ...], ...]
    """Per file (in this run's file order), the consumed ``[start, end)`` intervals."""
    starts: tuple[frozenset[int], ...]
    """Per file, the range starts the position names (its keys)."""
    world_size: int | None
    """The number of processes that wrote the position (``__world_size__``; inferred for a
    position written before it was recorded), or ``None`` when it names no range."""
    reserved: dict[str, Any]
    """The keys without a ``:`` (``__epochs_completed__``, ``__data_ts_watermark__`` ...)."""

    @property
    def rows(self) -> int:
        """How many rows are consumed."""
        return sum(e - s for per_file in self.intervals for s, e in per_file)


@dataclass(frozen=True, slots=True)
class Layout:
    """One data pass (or the rest of one): every rank's pieces and where the position starts."""

    world_size: int
    pieces: tuple[tuple[Piece, ...], ...]
    """Per rank, the pieces it reads, in order."""
    position: dict[str, Any]
    """The position this pass continues from: the saved one (by file), or an equivalent,
    compacted one (re-divided); batches add their rows to it."""
    redivided: bool
    """True when the unconsumed rows were re-divided (another number of processes)."""
    consumed_rows: int
    saved_world_size: int | None
    rank_rows: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rank_rows", tuple(sum(p.rows for p in ps) for ps in self.pieces))

    @property
    def remaining_rows(self) -> int:
        return sum(self.rank_rows)

    def steps(self, batch_size: int) -> int:
        """Batches in this pass: the most any rank has (ranks with fewer pad with empty ones)."""
        return max((math.ceil(n / batch_size) for n in self.rank_rows), default=0)

    def describe(self, batch_size: int) -> str:
        """One line for the log: what was re-divided, among how many processes, how evenly."""
        lo, hi = min(self.rank_rows), max(self.rank_rows)
        saved = f"{self.saved_world_size} process(es)" if self.saved_world_size else "another layout"
        return (
            f"the data position was written by {saved}; this run has {self.world_size}: the"
            f" {self.remaining_rows} rows of this pass not yet consumed ({self.consumed_rows} are) are"
            f" re-divided among the {self.world_size} processes ({lo}-{hi} rows each,"
            f" {self.steps(batch_size)} steps); every row is still read exactly once in this pass,"
            " in another order than an uninterrupted run"
        )


def position_key(path: str, start: int) -> str:
    """TorchEasyRec's position key of the range of ``path`` starting at row ``start``."""
    return f"{path}:{start}"


def read_position(
    position: Mapping[str, Any], paths: Sequence[str], rows: Sequence[int], source: str
) -> Consumed:
    """Parse a position whose keys name ``paths`` (already resolved), checking every range.

    Args:
        position: ``{"<path>:<range start>": last consumed row, reserved keys...}``.
        paths: this run's files, in read order.
        rows: their row counts.
        source: where the position comes from (a checkpoint), for messages.

    Raises:
        ConfigError: a key names a file not in ``paths`` (listed), a start or row is not an
            integer or lies outside its file (the file changed since the checkpoint).
    """
    index = {p: i for i, p in enumerate(paths)}
    ranges: list[list[Interval]] = [[] for _ in paths]
    starts: list[set[int]] = [set() for _ in paths]
    reserved: dict[str, Any] = {}
    unmatched: list[str] = []
    for key, value in position.items():
        path, sep, start_text = key.rpartition(":")
        if not sep:
            reserved[key] = value
            continue
        if path not in index:
            unmatched.append(key)
            continue
        i = index[path]
        try:
            start = int(start_text)
        except ValueError:
            raise ConfigError(
                f"{source}: data position key {key!r} does not end in a row number (':<range start>')"
            ) from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: data position {key!r} is {value!r}; a row number was expected")
        if not 0 <= start < rows[i] or not start - 1 <= value < rows[i]:
            raise ConfigError(
                f"{source}: data position {key!r} -> {value} lies outside {path}, which has {rows[i]}"
                " rows now: the file changed since the checkpoint, so the consumed rows are unknown."
                " Restore the original file, or start a new model_dir with --fine-tune-checkpoint"
                " (weights only, the data pass restarts)"
            )
        starts[i].add(start)
        if value >= start:
            ranges[i].append((start, value + 1))
    if unmatched:
        where = sorted({os.path.dirname(p) or "." for p in paths})
        raise ConfigError(
            f"{source}: the saved data position names {sorted(unmatched)[:3]}, which this run does not"
            f" read ({len(paths)} file(s) in {', '.join(where)}); resuming would re-read or skip data."
            " Resume with the same input paths, or start a new model_dir with --fine-tune-checkpoint"
            " (weights only, the data pass restarts)"
        )
    world = reserved.get(DATA_WORLD_SIZE)
    if world is not None and (isinstance(world, bool) or not isinstance(world, int) or world < 1):
        raise ConfigError(
            f"{source}: data position {DATA_WORLD_SIZE} is {world!r}; a process count was expected"
        )
    if world is None and any(starts):
        # Written before the process count was recorded: every rank then read a range of every
        # file in lockstep, so a file's keys are one per rank.
        world = max(len(s) for s in starts)
    return Consumed(
        intervals=tuple(tuple(_merge(r)) for r in ranges),
        starts=tuple(frozenset(s) for s in starts),
        world_size=world,
        reserved=reserved,
    )


def _merge(intervals: list[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _subtract(lo: int, hi: int, consumed: Sequence[Interval]) -> list[Interval]:
    """``[lo, hi)`` minus the sorted disjoint ``consumed`` intervals."""
    out: list[Interval] = []
    i = max(bisect.bisect_right(consumed, (lo, lo)) - 1, 0)
    cur = lo
    while cur < hi and i < len(consumed):
        s, e = consumed[i]
        if e <= cur:
            i += 1
            continue
        if s >= hi:
            break
        if s > cur:
            out.append((cur, s))
        cur = max(cur, e)
        i += 1
    if cur < hi:
        out.append((cur, hi))
    return out


def by_file_ranges(rows: Sequence[int], world_size: int, rank: int) -> list[tuple[int, int, int]]:
    """Rank ``rank``'s ``(file, lo, hi)`` ranges of a fresh pass: a ``1/world_size`` slice of each file.

    Example:
        >>> by_file_ranges([10, 3], 2, 1)
        [(0, 5, 10), (1, 1, 3)]
    """
    out = []
    for f, n in enumerate(rows):
        lo, hi = rank * n // world_size, (rank + 1) * n // world_size
        if hi > lo:
            out.append((f, lo, hi))
    return out


def _fits_by_file(consumed: Consumed, rows: Sequence[int], world_size: int) -> bool:
    """Whether the position is one the by-file division of ``world_size`` processes writes."""
    if not any(consumed.starts):
        return True
    if consumed.world_size != world_size:
        return False
    for f, n in enumerate(rows):
        allowed = {r * n // world_size for r in range(world_size)}
        if not consumed.starts[f] <= allowed:
            return False
    return True


def plan_pass(
    position: Mapping[str, Any] | None,
    paths: Sequence[str],
    rows: Sequence[int],
    world_size: int,
    source: str = "the data position",
) -> Layout:
    """Every rank's pieces for the rest of the pass that ``position`` is in.

    A position the by-file division of this many processes wrote (or none) continues that
    division: each rank reads what is left of its own ranges, so a same-size resume reads the
    same batches as an uninterrupted run. Any other position (written by another number of
    processes, or by a re-divided pass) has its unconsumed rows re-divided evenly; the
    returned position then encodes the consumed set compactly (one key per consumed run).

    Args:
        position: a saved position with keys naming ``paths`` (see :func:`read_position`).
        paths, rows: this run's files (resolved) and their row counts.
        world_size: this run's number of processes.
        source: named in error messages.

    Example:
        >>> lay = plan_pass({"a:0": 4, "a:5": 6, "__world_size__": 2}, ["a"], [10], 1)
        >>> lay.redivided, [(p.start, p.end) for p in lay.pieces[0]]
        (True, [(7, 10)])
    """
    consumed = read_position(position or {}, paths, rows, source)
    base = {k: v for k, v in consumed.reserved.items()}
    base.setdefault(EPOCHS_COMPLETED, 0)
    base[DATA_WORLD_SIZE] = world_size
    if _fits_by_file(consumed, rows, world_size):
        per_rank = []
        for r in range(world_size):
            pieces = []
            for f, lo, hi in by_file_ranges(rows, world_size, r):
                for s, e in _subtract(lo, hi, consumed.intervals[f]):
                    pieces.append(Piece(f, lo, s, e))
            per_rank.append(tuple(pieces))
        kept = {k: v for k, v in (position or {}).items() if ":" in k}
        return Layout(
            world_size,
            tuple(per_rank),
            {**kept, **base},
            redivided=False,
            consumed_rows=consumed.rows,
            saved_world_size=consumed.world_size,
        )
    remaining: list[tuple[int, int, int]] = []  # (file, start, end) in read order
    for f, n in enumerate(rows):
        remaining.extend((f, s, e) for s, e in _subtract(0, n, consumed.intervals[f]))
    total = sum(e - s for _, s, e in remaining)
    per_rank = []
    j, offset = 0, 0  # the next remaining interval, and rows of it already handed out
    for r in range(world_size):
        want = (r + 1) * total // world_size - r * total // world_size
        pieces = []
        while want > 0:
            f, s, e = remaining[j]
            take = min(want, e - s - offset)
            start = s + offset
            pieces.append(Piece(f, start, start, start + take))
            want -= take
            offset += take
            if offset == e - s:
                j, offset = j + 1, 0
        per_rank.append(tuple(pieces))
    compact = {
        position_key(paths[f], s): e - 1 for f, per_file in enumerate(consumed.intervals) for s, e in per_file
    }
    return Layout(
        world_size,
        tuple(per_rank),
        {**compact, **base},
        redivided=True,
        consumed_rows=consumed.rows,
        saved_world_size=consumed.world_size,
    )
