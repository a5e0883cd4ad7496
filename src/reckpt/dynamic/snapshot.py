"""A full copy of a dynamic table that is taken only if the table changes before it is read.

A checkpoint copies the tables when the save starts, so that an asynchronous save can
train on while the files are written. A full copy of a large table (the keys sorted, every
row gathered in key order into fresh memory) cost several times the disk write itself on
the machines measured, and a synchronous save, or an asynchronous one whose training does
not reach the table before the files are written, never needs it.

:class:`Snapshot` therefore starts as a promise: it refers to the table's key maps as they
are. The table calls :meth:`Snapshot.materialize` before any change to them
(``DynamicTable._settle``): only then is the copy made, exactly what the table held when
the snapshot was taken. Until then the dump reads the rows straight from the table
(:meth:`Part.gather`, in key order, chunk by chunk), and the copy and the reads exclude each
other through :attr:`Snapshot.lock`: a change waits for at most one chunk.

The keys are put in order in ranges: one pass partitions them into up to 16 ranges of
about equal size (split at quantiles of a sample), and a helper thread sorts the ranges one
after another, so the first rows are written while the later ranges are still being sorted.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np

from reckpt.dynamic.columns import both, empty_array

if TYPE_CHECKING:
    from reckpt.dynamic.index import KeyMap

__all__ = ["Part", "Snapshot", "Staging", "find_gather"]

_RANGES = 16
_RANGES_FROM = 1 << 20  # fewer keys: one range
_SAMPLE = 1 << 16
_HALVES_FROM = 1 << 16


def find_gather(m: KeyMap, keys: np.ndarray, outs: dict[str, np.ndarray]) -> None:
    """``outs[name][i] = m.cols[name][id of keys[i]]`` for keys all held by ``m``.

    A chain of random reads (the index entry, then the rows) bounded by memory latency: from
    :data:`_HALVES_FROM` keys on, two threads take half each, keeping twice as many in flight.
    """
    k = m.k
    if k is None or m.index.live == 0:
        ids = m.find(keys)
        for name, out in outs.items():
            np.take(m.cols[name].np, ids, axis=0, out=out[: len(keys)])
        return
    keys = np.ascontiguousarray(keys, dtype=np.int64)
    srcs = np.array([m.cols[name].np.ctypes.data for name in outs], dtype=np.int64)
    widths = np.array([m.cols[name].row_bytes for name in outs], dtype=np.int64)
    table, n = m.index.table, len(keys)
    cut = [0, n // 2, n] if n >= _HALVES_FROM else [0, n]
    found = [0, 0]

    def part(h: int) -> None:
        lo, hi = cut[h], cut[h + 1]
        dsts = np.array([out[lo:].ctypes.data for out in outs.values()], dtype=np.int64)
        found[h] = k.find_gather(
            table.ctypes.data, m.index.mask, keys[lo:].ctypes.data, hi - lo, len(outs),
            srcs.ctypes.data, widths.ctypes.data, dsts.ctypes.data,
        )  # fmt: skip

    if len(cut) == 3:
        both(part)
    else:
        part(0)
    if sum(found) != n:
        raise RuntimeError(f"a snapshot's keys are missing from its table ({n - sum(found)} of {n})")


def _partition(m: KeyMap, split: np.ndarray, flags: np.ndarray | None, out: np.ndarray) -> list[int]:
    """Scatter the live keys of ``m`` into ``out`` by range of ``split``; the ranges' bounds.

    Two threads (the C kernels release the GIL), each over half of the ids: both count, then
    each writes its keys after the other's in every range.
    """
    k = m.k
    assert k is not None
    keys, n, r = m.keys.np, m.high, len(split) + 1
    fp = None if flags is None else flags.ctypes.data
    halves = [(0, n // 2), (n // 2, n)]
    counts = np.zeros((2, r), dtype=np.int64)

    def count(h: int) -> None:
        lo, hi = halves[h]
        k.count(keys.ctypes.data, fp, lo, hi, split.ctypes.data, len(split), counts[h].ctypes.data)

    both(count)
    starts = np.concatenate([[0], np.cumsum(counts.sum(axis=0))])
    at = np.stack([starts[:-1], starts[:-1] + counts[0]])

    def scatter(h: int) -> None:
        lo, hi = halves[h]
        k.scatter(
            keys.ctypes.data, fp, lo, hi, split.ctypes.data, len(split), at[h].ctypes.data, out.ctypes.data
        )

    both(scatter)
    return [int(x) for x in starts]


class Staging:
    """Buffers for rows gathered in key order on their way to the files, kept for the next dump.

    First writes to fresh memory cost as much as the gather itself on the machines measured;
    a table keeps one of these so that its dumps reuse the same buffers (at most a few chunks
    of :data:`reckpt.dynamic.files.CHUNK_BYTES`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[dict[str, np.ndarray]] = []

    def take(self, shapes: dict[str, tuple[tuple[int, ...], np.dtype]], rows: int) -> dict[str, np.ndarray]:
        """A set of buffers of ``rows`` rows per column (a kept one when one fits)."""
        with self._lock:
            for i, bufs in enumerate(self._free):
                fits = set(bufs) == set(shapes) and all(
                    len(bufs[k]) >= rows and bufs[k].shape[1:] == row and bufs[k].dtype == dt
                    for k, (row, dt) in shapes.items()
                )
                if fits:
                    return self._free.pop(i)
        return {k: empty_array((rows, *row), dt) for k, (row, dt) in shapes.items()}

    def give(self, bufs: dict[str, np.ndarray], keep: int) -> None:
        """Hand back a set of buffers; at most ``keep`` sets are kept."""
        with self._lock:
            if len(self._free) < keep:
                self._free.append(bufs)


class Part:
    """One key map of a snapshot (the rows, or the admission counter): keys in order, columns.

    Args:
        m: the key map as it is now.
        names: its value columns the snapshot carries.
    """

    def __init__(self, m: KeyMap, names: tuple[str, ...], touched: bool = False) -> None:
        self.m: KeyMap | None = m
        self.names = names
        self.shapes = {name: (m.cols[name].row, m.cols[name].dtype) for name in names}
        self._keys: np.ndarray | None = None
        self._bounds: list[int] = []
        self._sorted: list[threading.Event] = []
        self.n = len(m)
        if touched:  # the set of keys is fixed now (the marks may be cleared next): one range
            keys = np.sort(m.keys.np[m.touched_ids()])
            done = threading.Event()
            done.set()
            self._keys, self._bounds, self._sorted, self.n = keys, [0, len(keys)], [done], len(keys)
        self._sorter: threading.Thread | None = None
        self._copies: dict[str, np.ndarray] | None = None

    def _order(self) -> np.ndarray:
        """The live keys partitioned into ranges, each sorted by a helper thread (caller holds the lock)."""
        if self._keys is not None:
            return self._keys
        m, n = self.m, self.n
        if m is None:
            raise RuntimeError("the snapshot was released before it was read")
        out = empty_array((n,), np.int64)
        dense = m.n_free == 0  # no free id: every id is live
        if m.k is not None and n >= _RANGES_FROM:
            pick = np.random.default_rng(n).integers(0, m.high, _SAMPLE)
            if not dense:
                pick = pick[(m.flags.np[pick] & 1).astype(bool)]
            sample = np.sort(m.keys.np[pick])
            at = np.linspace(0, len(sample), _RANGES + 1)[1:-1].astype(np.int64)
            split = np.unique(sample[at]) if len(sample) else np.empty(0, np.int64)
            self._bounds = _partition(m, split, None if dense else m.flags.np, out)
        else:
            if dense:
                out[:] = m.keys.np[: m.high]
            else:
                np.take(m.keys.np, m.live_ids(), out=out)
            self._bounds = [0, n]
        self._keys = out
        self._sorted = [threading.Event() for _ in self._bounds[1:]]
        self._sorter = threading.Thread(target=self._sort, name="reckpt-dyn-sort", daemon=True)
        try:
            self._sorter.start()
        except RuntimeError:  # no new threads at interpreter shutdown: sort here
            self._sorter = None
            self._sort()
        return out

    def _sort(self) -> None:
        keys = self._keys
        assert keys is not None
        for r, done in enumerate(self._sorted):
            try:
                keys[self._bounds[r] : self._bounds[r + 1]].sort()  # NumPy's vectorised sort, GIL released
            finally:
                done.set()

    def sorted_until(self, stop: int) -> np.ndarray:
        """The keys in order, waiting until at least ``[0, stop)`` is sorted (takes the lock to start)."""
        keys = self._keys
        if keys is None:
            raise RuntimeError("Part.order() first")
        for r, done in enumerate(self._sorted):
            if self._bounds[r] >= stop:
                break
            done.wait()
        return keys

    def frontier(self) -> int:
        """How many keys, from the first, are sorted now (without waiting)."""
        done = 0
        for r, ready in enumerate(self._sorted):
            if not ready.is_set():
                break
            done = self._bounds[r + 1]
        return done

    def order(self) -> None:
        """Start putting the keys in order (the caller holds the snapshot's lock)."""
        self._order()

    def keys(self) -> np.ndarray:
        """Every key, ascending (the caller holds the lock)."""
        self._order()
        return self.sorted_until(self.n)

    def gather(self, start: int, stop: int, outs: dict[str, np.ndarray]) -> None:
        """Rows ``[start, stop)`` in key order of the named columns into ``outs[name][: stop - start]``.

        The caller holds the lock and waited for ``[0, stop)`` to be sorted.
        """
        n = stop - start
        if self._copies is not None:
            for name, out in outs.items():
                out[:n] = self._copies[name][start:stop]
            return
        if self.m is None or self._keys is None:
            raise RuntimeError("the snapshot was released before it was read")
        find_gather(self.m, self._keys[start:stop], outs)

    def materialize(self) -> None:
        """Copy what is still read from the key map (its keys, then every row) and let go of it."""
        if self.m is None:
            return
        keys = self.keys()
        copies = {name: empty_array((self.n, *row), dtype) for name, (row, dtype) in self.shapes.items()}
        find_gather(self.m, keys, copies)
        self._copies, self.m = copies, None

    def release(self) -> None:
        """Forget the key map and any copy (waits for the helper thread)."""
        if self._sorter is not None:
            self._sorter.join()
            self._sorter = None
        self.m, self._copies, self._keys = None, None, None


class Snapshot:
    """The rows and counters of a table as of its creation (see the module docstring).

    Args:
        rows: the table's rows.
        counts: its admission counter.
        removed: for a snapshot of the touched rows only (an incremental dump): the keys
            evicted since the marks were cleared; their set and the touched keys are taken
            now, the rows stay in the table until they are read or the table changes.
        staging: buffers for the rows on their way to the files, reused from dump to dump.
    """

    def __init__(
        self, rows: KeyMap, counts: KeyMap, removed: np.ndarray | None = None, staging: Staging | None = None
    ) -> None:
        self.lock = threading.Lock()
        touched = removed is not None
        self.rows = Part(rows, ("values", "opt", "scores"), touched)
        self.counts = Part(counts, ("freq",), touched)
        self.removed = removed
        self.staging = staging if staging is not None else Staging()
        self._maps: tuple[KeyMap, KeyMap] | None = (rows, counts)

    def reads(self, rows: KeyMap, counts: KeyMap) -> bool:
        """Whether a change to ``rows`` or ``counts`` would change what this snapshot reads."""
        return self._maps is not None and (self._maps[0] is rows or self._maps[1] is counts)

    def materialize(self) -> None:
        """Copy everything still read from the table (before the table changes)."""
        with self.lock:
            if self._maps is None:
                return
            self.rows.materialize()
            self.counts.materialize()
            self._maps = None

    def release(self) -> None:
        """Drop the references to the table and any copy (the files are written)."""
        with self.lock:
            self.rows.release()
            self.counts.release()
            self._maps = None
