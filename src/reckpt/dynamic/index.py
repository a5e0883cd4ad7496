"""A vectorised key index: int64 keys to dense ids, as batch operations without per-key Python.

:class:`HashIndex` is an open-addressing (linear probing) hash table hashed by SplitMix64.
An entry is 8 bytes: the hash's high 32 bits (a tag that rules out almost every other key
without reading it) and a 31-bit id; the keys themselves live in a separate column
(``store[id]``). The table is at most half full (16 to 32 bytes per key). Every operation
takes a whole batch: :meth:`~HashIndex.find` and :meth:`~HashIndex.insert` run in the C
kernels of :mod:`reckpt.dynamic._native` (group prefetching: 64 keys' lines in flight), or,
where those are not available, in NumPy rounds (each round probes every unresolved key
once) over the same layout. Deletions leave tombstones; the table is rebuilt when live keys
plus tombstones pass half of it.

:class:`KeyMap` adds what a table of rows needs on top: the key column, a flags column
(:data:`LIVE`, :data:`TOUCHED`), a free list of ids and any number of value columns
(:class:`reckpt.dynamic.columns.Column`) that grow with it.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from reckpt.dynamic import _native
from reckpt.dynamic.columns import Column, huge_array

__all__ = ["HashIndex", "KeyMap", "kernels", "mix64", "LIVE", "TOUCHED", "EMPTY", "TOMB"]

logger = logging.getLogger(__name__)

EMPTY_ID, TOMB_ID = 0xFFFFFFFF, 0xFFFFFFFE
EMPTY = np.uint64(0xFFFFFFFFFFFFFFFF)
TOMB = np.uint64(0xFFFFFFFFFFFFFFFE)
LIVE, TOUCHED = np.uint8(1), np.uint8(2)
MAX_LOAD = 0.5
_LOW = np.uint64(0xFFFFFFFF)
_HIGH = np.uint64(0xFFFFFFFF00000000)
_REBUILD_CHUNK = 1 << 22
MAX_IDS = (1 << 31) - 2

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 (wrapping arithmetic); the index's hash."""
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        out: np.ndarray = x ^ (x >> np.uint64(31))
    return out


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
        index.insert(keys, ids, keys)
    for index in built:  # each path reads the table either path built
        for reader in (None, k):
            if not np.array_equal(HashIndex.over(index.table, reader).find(probe, keys)[0], want):
                raise RuntimeError("the C index disagrees with the NumPy index")


def _np_find(table: np.ndarray, mask: int, store: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NumPy rounds of linear probing: ids of ``q`` in ``table`` (-1: absent) and positions."""
    n = len(q)
    ids = np.full(n, -1, dtype=np.int64)
    pos = np.full(n, -1, dtype=np.int64)
    active = np.arange(n, dtype=np.int64)
    h = mix64(q.view(np.uint64))
    p = (h & np.uint64(mask)).view(np.int64)
    tag = h >> np.uint64(32)
    keys = q
    while len(active):
        e = table[p]
        s = (e & _LOW).astype(np.int64)
        match = (s < TOMB_ID) & ((e >> np.uint64(32)) == tag)
        match[match] = store[s[match]] == keys[match]
        ids[active[match]] = s[match]
        pos[active[match]] = p[match]
        go = ~match & (s != EMPTY_ID)
        active, keys, tag, p = active[go], keys[go], tag[go], (p[go] + 1) & mask
    return ids, pos


def _np_insert(table: np.ndarray, mask: int, q: np.ndarray, ids: np.ndarray) -> int:
    """NumPy rounds of insertion of absent, distinct keys; returns the tombstones reused."""
    h = mix64(q.view(np.uint64))
    p = (h & np.uint64(mask)).view(np.int64)
    entry = (h & _HIGH) | ids.astype(np.uint64)
    tombs = 0
    while len(p):
        free = np.flatnonzero((table[p] & _LOW) >= TOMB_ID)
        _, first = np.unique(p[free], return_index=True)  # one key per free position per round
        win = free[first]
        at = p[win]
        tombs += int(np.count_nonzero(table[at] == TOMB))
        table[at] = entry[win]
        lose = np.ones(len(p), dtype=bool)
        lose[win] = False
        p, entry = (p[lose] + 1) & mask, entry[lose]
    return tombs


class HashIndex:
    """Linear-probing table of tagged ids whose keys are ``store[id]`` (see the module docstring).

    Args:
        expected: keys it should hold without a rebuild.
        k: the C kernels, or ``None`` for the NumPy path.
        load: the fill ``expected`` keys should leave (at most :data:`MAX_LOAD`).
    """

    def __init__(self, expected: int, k: _native.Kernels | None, load: float = MAX_LOAD) -> None:
        self.k = k
        size = 16
        while size * load < max(expected, 1):
            size *= 2
        self.table = huge_array(size, np.uint64, EMPTY)
        self.mask = size - 1
        self.live = 0
        self.tombs = 0

    @classmethod
    def over(cls, table: np.ndarray, k: _native.Kernels | None) -> HashIndex:
        """An index reading an existing ``table`` (counts not tracked: for :meth:`find` only)."""
        index = cls(0, k)
        index.table, index.mask = table, len(table) - 1
        return index

    def find(self, q: np.ndarray, store: np.ndarray, positions: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, positions)`` of int64 keys ``q`` (-1 where absent; positions empty unless asked)."""
        q = np.ascontiguousarray(q, dtype=np.int64)
        if self.k is None:
            return _np_find(self.table, self.mask, store, q)
        ids = np.empty(len(q), dtype=np.int64)
        pos = np.empty(len(q) if positions else 0, dtype=np.int64)
        self.k.find(
            self.table.ctypes.data, self.mask, store.ctypes.data, q.ctypes.data, len(q),
            ids.ctypes.data, pos.ctypes.data if positions else None,
        )  # fmt: skip
        return ids, pos

    def fits(self, more: int) -> bool:
        """Whether ``more`` keys can be inserted without passing the load limit."""
        return (self.live + self.tombs + more) <= MAX_LOAD * len(self.table)

    def insert(self, q: np.ndarray, ids: np.ndarray, store: np.ndarray) -> None:
        """Insert absent, distinct keys ``q`` with ``ids`` (the caller checked :meth:`fits`)."""
        q = np.ascontiguousarray(q, dtype=np.int64)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if self.k is None:
            reused = _np_insert(self.table, self.mask, q, ids)
        else:
            reused = int(
                self.k.insert(self.table.ctypes.data, self.mask, q.ctypes.data, ids.ctypes.data, len(q))
            )
        self.live += len(q)
        self.tombs -= reused

    def erase(self, positions: np.ndarray) -> None:
        """Delete the entries at ``positions`` (from :meth:`find`; distinct, all live)."""
        self.table[positions] = TOMB
        self.live -= len(positions)
        self.tombs += len(positions)


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
        return self.index.find(q, self.keys.np, positions=False)[0]

    def add(self, q: np.ndarray) -> np.ndarray:
        """New ids for absent, distinct keys ``q`` (flags :data:`LIVE`; value columns not set)."""
        n = len(q)
        if n == 0:
            return np.empty(0, dtype=np.int64)
        if not self.index.fits(n):
            size = len(self.index.table)
            if len(self) + n > size * MAX_LOAD / 2:  # else mostly tombstones: same size
                size *= 2
            while len(self) + n > size * MAX_LOAD:
                size *= 2
            self._rebuild(size)
        reuse = min(n, self.n_free)
        fresh = n - reuse
        ids = np.empty(n, dtype=np.int64)
        ids[:reuse] = self.free[self.n_free - reuse : self.n_free][::-1]
        self.n_free -= reuse
        if fresh:
            start = self.high
            if start + fresh > MAX_IDS:
                raise RuntimeError(f"a dynamic table shard cannot hold more than {MAX_IDS} rows")
            ids[reuse:] = np.arange(start, start + fresh, dtype=np.int64)
            for c in (self.keys, self.flags, *self.cols.values()):
                c.resize(start + fresh)
        self.keys.np[ids] = q
        self.flags.np[ids] = LIVE
        self.index.insert(q, ids, self.keys.np)
        return ids

    def remove(self, ids: np.ndarray) -> None:
        """Delete the live, distinct ids ``ids`` (their ids become free; flags cleared)."""
        if len(ids) == 0:
            return
        _, pos = self.index.find(self.keys.np[ids], self.keys.np)
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
        return np.flatnonzero(self.flags.np & LIVE)

    def touched_ids(self) -> np.ndarray:
        """Ids of live keys flagged :data:`TOUCHED`, ascending."""
        return np.flatnonzero(self.flags.np == (LIVE | TOUCHED))

    def touch(self, ids: np.ndarray) -> None:
        """Flag live ``ids`` as touched."""
        self.flags.np[ids] = LIVE | TOUCHED

    def untouch_all(self) -> None:
        """Clear every touched flag."""
        np.bitwise_and(self.flags.np, LIVE, out=self.flags.np)

    def _rebuild(self, size: int) -> None:
        """A new index of ``size`` entries, without tombstones.

        The old table goes first and the keys are inserted in chunks, so that a rebuild
        never holds two tables or whole-table temporaries at once.
        """
        self.index = HashIndex(0, self.k)
        index = HashIndex(int(size * MAX_LOAD), self.k)
        flags, keys = self.flags.np, self.keys.np
        dense = self.n_free == 0  # no id was ever freed, or all were reused: every id is live
        for start in range(0, self.high, _REBUILD_CHUNK):
            end = min(start + _REBUILD_CHUNK, self.high)
            if dense:
                index.insert(keys[start:end], np.arange(start, end, dtype=np.int64), keys)
            else:
                live = np.flatnonzero(flags[start:end] & LIVE) + start
                index.insert(keys[live], live, keys)
        self.index = index
