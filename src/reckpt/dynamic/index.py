"""Keys to dense ids for the dynamic tables: :class:`KeyMap` over a :class:`HashIndex`.

:class:`KeyMap` adds what a table of rows needs to the hash index of
:mod:`reckpt.dynamic.hashindex`: the key column, a flags column (:data:`LIVE`,
:data:`TOUCHED`), a free list of ids and any number of value columns
(:class:`reckpt.dynamic.columns.Column`) that grow with it. :func:`kernels` loads the C
kernels once per process (or decides on the NumPy path).
"""

from __future__ import annotations

import logging
import os

import numpy as np

from reckpt.dynamic import _native
from reckpt.dynamic.columns import Column
from reckpt.dynamic.hashindex import ENTRY, MAX_LOAD, HashIndex, mix64

_REBUILD_CHUNK = 1 << 22
MAX_IDS = (1 << 31) - 2
LIVE, TOUCHED = np.uint8(1), np.uint8(2)

__all__ = ["HashIndex", "KeyMap", "kernels", "mix64", "ENTRY", "LIVE", "TOUCHED", "MAX_IDS"]

logger = logging.getLogger(__name__)

_KERNELS: list[_native.Kernels | None] = []


def kernels() -> _native.Kernels | None:
    """The C kernels (built, loaded and checked once per process), or ``None``: the NumPy path.

    ``RECKPT_DYNAMIC_KERNELS=0`` forces the NumPy path; ``=1`` makes a failure an error.

    Raises:
        RuntimeError: ``RECKPT_DYNAMIC_KERNELS=1`` and the kernels are unavailable.
    """
    if _KERNELS:
        return _KERNELS[0]
    mode = os.environ.get("RECKPT_DYNAMIC_KERNELS", "auto")
    got: _native.Kernels | None = None
    if mode != "0":
        try:
            got = _native.load()
            _self_check(got)
        except Exception as e:
            if mode == "1":
                raise RuntimeError(f"RECKPT_DYNAMIC_KERNELS=1 but the kernels are unavailable: {e}") from e
            logger.warning("dynamic tables: C kernels unavailable (%s); using the NumPy path", e)
            got = None
    _KERNELS.append(got)
    return got


def _self_check(k: _native.Kernels) -> None:
    """The kernels agree with the NumPy path on a small index (else they are not used)."""
    rng = np.random.default_rng(0)
    keys = np.unique(rng.integers(-(1 << 62), 1 << 62, 3000, dtype=np.int64))
    ids = np.arange(len(keys), dtype=np.int64)
    probe = np.concatenate([keys[::3], keys[::5] + 1])
    want = np.where(np.isin(probe, keys), np.searchsorted(keys, probe), -1)
    built = [HashIndex(len(keys), None), HashIndex(len(keys), k)]
    for index in built:
        index.insert(keys, ids)
    grown = HashIndex(len(keys), k)
    grown.insert(keys, ids)
    if not grown.double():
        raise RuntimeError("the C index could not double a small table")
    built.append(grown)
    for index in built:  # each path reads the table either path built
        for reader in (None, k):
            if not np.array_equal(HashIndex.over(index.table, reader).find(probe)[0], want):
                raise RuntimeError("the C index disagrees with the NumPy index")


class KeyMap:
    """int64 keys to dense ids ``[0, high)``: index, key and flags columns, free ids, value columns.

    Columns of one number per key (keys, flags, scores, counts) are read and written at
    random by every batch and ask for huge pages; wide ones (embedding rows) do not.

    Args:
        columns: name -> (NumPy dtype, row shape) of the value columns that grow with the ids.
        k: the C kernels, or ``None`` for the NumPy path.
    """

    def __init__(self, columns: dict[str, tuple[object, tuple[int, ...]]], k: _native.Kernels | None) -> None:
        self.k = k
        self.specs = columns
        self.keys = Column(np.int64, huge=True)
        self.flags = Column(np.uint8, huge=True)
        self.cols = {name: Column(dtype, row, huge=not row) for name, (dtype, row) in columns.items()}
        self.index = HashIndex(0, k)
        self.free = np.empty(0, dtype=np.int64)
        self.n_free = 0

    def __len__(self) -> int:
        return self.index.live

    @property
    def high(self) -> int:
        """Ids ever handed out: every column has this many rows."""
        return self.keys.n

    def find(self, q: np.ndarray) -> np.ndarray:
        """Ids of keys ``q`` (-1 where absent)."""
        if self.index.live == 0:
            return np.full(len(q), -1, dtype=np.int64)
        return self.index.find(q, positions=False)[0]

    def _make_fit(self, n: int) -> None:
        """Rebuild the index (larger, or without tombstones) unless ``n`` more keys fit."""
        if self.index.fits(n):
            return
        size = len(self.index.table)
        if len(self) + n > size * MAX_LOAD / 2:  # else mostly tombstones: same size
            size *= 2
        while len(self) + n > size * MAX_LOAD:
            size *= 2
        self._rebuild(size)

    def _new_ids(self, n: int) -> tuple[np.ndarray, int]:
        """``n`` ids to hand out in this order (free ids first, latest freed first) and how many reuse."""
        reuse = min(n, self.n_free)
        ids = np.empty(n, dtype=np.int64)
        ids[:reuse] = self.free[self.n_free - reuse : self.n_free][::-1]
        start = self.high
        if start + n - reuse > MAX_IDS:
            raise RuntimeError(f"a dynamic table shard cannot hold more than {MAX_IDS} rows")
        ids[reuse:] = np.arange(start, start + n - reuse, dtype=np.int64)
        return ids, reuse

    def _take_ids(self, ids: np.ndarray, reuse: int) -> None:
        """Account for handing out ``ids`` (the first ``reuse`` from the free list); grow columns."""
        used = min(len(ids), reuse)
        self.n_free -= used
        fresh = len(ids) - used
        if fresh:
            end = self.high + fresh
            for c in (self.keys, self.flags, *self.cols.values()):
                c.resize(end)

    def add(self, q: np.ndarray) -> np.ndarray:
        """New ids for absent, distinct keys ``q`` (flags :data:`LIVE`; value columns not set)."""
        n = len(q)
        if n == 0:
            return np.empty(0, dtype=np.int64)
        self._make_fit(n)
        ids, reuse = self._new_ids(n)
        self._take_ids(ids, reuse)
        self.keys.np[ids] = q
        self.flags.np[ids] = LIVE
        self.index.insert(q, ids)
        return ids

    def upsert(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Ids of distinct keys ``q``, adding the absent ones (as :meth:`add` would, in ``q``'s order).

        Returns ``(ids, created, reused)``: ``created``: positions in ``q`` of the keys added
        (flags :data:`LIVE`; their value columns not set); the first ``reused`` of them got
        freed ids, the others fresh ones (ascending from the old :attr:`high`: rows that read
        zero).
        """
        n = len(q)
        if n == 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64), 0
        self._make_fit(n)
        cand, reuse = self._new_ids(n)
        ids, created = self.index.upsert(q, cand)
        c = len(created)
        reused = min(c, reuse)
        start = self.high
        self._take_ids(cand[:c], reuse)
        if reused == 0:  # one run of fresh ids: slices, not scatters
            self.keys.np[start : start + c] = q[created]
            self.flags.np[start : start + c] = LIVE
        else:
            self.keys.np[cand[:c]] = q[created]
            self.flags.np[cand[:c]] = LIVE
        return ids, created, reused

    def remove(self, ids: np.ndarray) -> None:
        """Delete the live, distinct ids ``ids`` (their ids become free; flags cleared)."""
        if len(ids) == 0:
            return
        _, pos = self.index.find(self.keys.np[ids])
        self.index.erase(pos)
        self.flags.np[ids] = 0
        need = self.n_free + len(ids)
        if need > len(self.free):
            grown = np.empty(max(need, 2 * len(self.free), 1024), dtype=np.int64)
            grown[: self.n_free] = self.free[: self.n_free]
            self.free = grown
        self.free[self.n_free : need] = ids
        self.n_free = need

    def live_ids(self) -> np.ndarray:
        """Ids of every live key, ascending."""
        return self._select(LIVE, LIVE)

    def touched_ids(self) -> np.ndarray:
        """Ids of live keys flagged :data:`TOUCHED`, ascending."""
        return self._select(LIVE | TOUCHED, LIVE | TOUCHED)

    def _select(self, mask: np.uint8, want: np.uint8) -> np.ndarray:
        """Ids whose flags have the bits ``mask`` set to ``want`` (two passes in C: no temporaries)."""
        flags = self.flags.np
        if self.k is None:
            return np.flatnonzero((flags & mask) == want)
        n = int(self.k.select(flags.ctypes.data, len(flags), int(mask), int(want), None))
        out = np.empty(n, dtype=np.int64)
        self.k.select(flags.ctypes.data, len(flags), int(mask), int(want), out.ctypes.data)
        return out

    def touch(self, ids: np.ndarray) -> None:
        """Flag live ``ids`` as touched."""
        self.flags.np[ids] = LIVE | TOUCHED

    def untouch_all(self) -> None:
        """Clear every touched flag."""
        np.bitwise_and(self.flags.np, LIVE, out=self.flags.np)

    def _rebuild(self, size: int) -> None:
        """The index at ``size`` slots, without tombstones.

        A doubling runs in place in the C kernel; otherwise (or if it cannot) the table is
        emptied and the live keys are inserted again in chunks, so that a rebuild never
        holds two tables or whole-table temporaries at once.
        """
        if size == 2 * len(self.index.table) and self.index.double():
            return
        self.index.reset(size)
        flags, keys = self.flags.np, self.keys.np
        dense = self.n_free == 0  # no id was ever freed, or all were reused: every id is live
        for start in range(0, self.high, _REBUILD_CHUNK):
            end = min(start + _REBUILD_CHUNK, self.high)
            if dense:
                self.index.insert(keys[start:end], np.arange(start, end, dtype=np.int64))
            else:
                live = np.flatnonzero(flags[start:end] & LIVE) + start
                self.index.insert(keys[live], live)
