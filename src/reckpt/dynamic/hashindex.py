"""The hash index of the dynamic tables: 12-byte entries (the key's full hash and its id).

:class:`HashIndex` is an open-addressing (linear probing) hash table hashed by SplitMix64.
An entry is 12 bytes: the key's full 64-bit hash and a 31-bit id. SplitMix64's finaliser is
a bijection on 64 bits, so the hash identifies the key: a lookup reads one index entry per
key and never the key column (the one random read per key that bounds lookups). The table
is at most half full. Every operation takes a whole batch: :meth:`~HashIndex.find`,
:meth:`~HashIndex.insert` and :meth:`~HashIndex.upsert` (both in one probe) run in the C
kernels of :mod:`reckpt.dynamic._native` (each key's slot prefetched 16 keys ahead), or,
where those are not available, in NumPy rounds (each round probes every unresolved key once)
over the same layout, so either path reads the table the other built. Deletions leave
tombstones; a doubling runs in place in the C kernel (one pass over the old slots, almost
sequential writes).

A table of more than :data:`_RESERVE_FROM` slots lives in an address-space reservation that
asks for huge pages (random probes: 2-3x the lookup rate of 4 KiB pages, measured on a
1.5 GB index); it grows in place, so a doubling faults in only the new half, and that half
is faulted in ahead by a background thread (:data:`_AHEAD_AT`).
"""

from __future__ import annotations

import mmap

import numpy as np

from reckpt.dynamic import _native
from reckpt.dynamic.columns import Prefaulter, both, reserve

__all__ = ["ENTRY", "EMPTY_ID", "TOMB_ID", "MAX_LOAD", "HashIndex", "mix64"]

EMPTY_ID, TOMB_ID = 0xFFFFFFFF, 0xFFFFFFFE
ENTRY = np.dtype([("h", "<u8"), ("id", "<u4")])
"""An index entry (12 bytes, packed): the key's hash and its id (or a free / deleted marker)."""
MAX_LOAD = 0.5
_RESERVE_FROM = 1 << 18
_MAX_SLOTS = 1 << 32
_SPILL = 1 << 16
_AHEAD_AT = 0.4
"""At this fill (of :data:`MAX_LOAD`'s 0.5) the next doubling's new half is faulted in by a
background thread: huge pages fault in at 0.35-0.7 GB/s on the machines measured, and a
doubling waiting for 0.8 GB of them took 2.2 s of the 2.8 s it cost. Resident memory runs
ahead of the table by up to the index's size while it is between 0.4 and 0.5 full."""
_AHEAD_FROM = 64 << 20
_BUILD_HALVES_FROM = 1 << 20
_PREFAULT = Prefaulter()

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


def _ptr(a: np.ndarray) -> int:
    return int(a.ctypes.data)


def _np_find(table: np.ndarray, mask: int, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NumPy rounds of linear probing: ids of ``q`` in ``table`` (-1: absent) and slots."""
    n = len(q)
    ids = np.full(n, -1, dtype=np.int64)
    pos = np.full(n, -1, dtype=np.int64)
    active = np.arange(n, dtype=np.int64)
    h = mix64(q.view(np.uint64))
    p = (h & np.uint64(mask)).view(np.int64)
    th, tid = table["h"], table["id"]
    while len(active):
        s = tid[p].astype(np.int64)
        match = (s < TOMB_ID) & (th[p] == h)
        ids[active[match]] = s[match]
        pos[active[match]] = p[match]
        go = ~match & (s != EMPTY_ID)
        active, h, p = active[go], h[go], (p[go] + 1) & mask
    return ids, pos


def _np_insert(table: np.ndarray, mask: int, q: np.ndarray, ids: np.ndarray) -> int:
    """NumPy rounds of insertion of absent, distinct keys; returns the tombstones reused."""
    h = mix64(q.view(np.uint64))
    p = (h & np.uint64(mask)).view(np.int64)
    new_id = ids.astype(np.uint32)
    th, tid = table["h"], table["id"]
    tombs = 0
    while len(p):
        free = np.flatnonzero(tid[p] >= TOMB_ID)
        _, first = np.unique(p[free], return_index=True)  # one key per free slot per round
        win = free[first]
        at = p[win]
        tombs += int(np.count_nonzero(tid[at] == TOMB_ID))
        th[at] = h[win]
        tid[at] = new_id[win]
        lose = np.ones(len(p), dtype=bool)
        lose[win] = False
        p, h, new_id = (p[lose] + 1) & mask, h[lose], new_id[lose]
    return tombs


class HashIndex:
    """Linear-probing table of (hash, id) entries (see the module docstring).

    Args:
        expected: keys it should hold without a rebuild.
        k: the C kernels, or ``None`` for the NumPy path.
        load: the fill ``expected`` keys should leave (at most :data:`MAX_LOAD`).
    """

    def __init__(
        self, expected: int, k: _native.Kernels | None, load: float = MAX_LOAD, fill: bool = True
    ) -> None:
        self.k = k
        size = 16
        while size * load < max(expected, 1):
            size *= 2
        self._room: np.ndarray = np.empty(0, dtype=ENTRY)  # the memory: the table is its start
        self._map: mmap.mmap | None = None
        self.table = self._slots(size)
        if fill:
            self.table.view(np.uint8).fill(0xFF)
        self.mask = size - 1
        self.live = 0
        self.tombs = 0
        self._ahead = 0  # slots of the reservation faulted in, or asked to be

    def _prefault_next(self) -> None:
        """Past :data:`_AHEAD_AT`, have the next doubling's new half faulted in, in the background."""
        size = len(self.table)
        if self._map is None or self._ahead >= 2 * size or self.live + self.tombs < _AHEAD_AT * size:
            return
        if size * ENTRY.itemsize < _AHEAD_FROM:  # small halves fault in quickly enough as they go
            return
        if 2 * size <= len(self._room):
            _PREFAULT.submit(self._map, size * ENTRY.itemsize, 2 * size * ENTRY.itemsize)
        self._ahead = 2 * size

    def _slots(self, size: int) -> np.ndarray:
        """A view of ``size`` slots whose start holds the current table (grown if needed)."""
        if size <= len(self._room):
            return self._room[:size]
        old = self._room
        room: np.ndarray | None = None
        if size > _RESERVE_FROM and self._map is None:
            m = reserve(_MAX_SLOTS * ENTRY.itemsize, huge=True)
            if m is not None:
                self._map = m
                room = np.frombuffer(m, dtype=ENTRY, count=_MAX_SLOTS)
        if room is None:
            room = np.empty(size, dtype=ENTRY)
        if len(old):
            room[: len(old)] = old
        self._room = room
        return room[:size]

    @classmethod
    def over(cls, table: np.ndarray, k: _native.Kernels | None) -> HashIndex:
        """An index reading an existing ``table`` (counts not tracked: for :meth:`find` only)."""
        index = cls(0, k)
        index.table, index.mask = table, len(table) - 1
        return index

    def find(self, q: np.ndarray, positions: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, slots)`` of int64 keys ``q`` (-1 where absent; slots empty unless asked)."""
        q = np.ascontiguousarray(q, dtype=np.int64)
        if self.k is None:
            return _np_find(self.table, self.mask, q)
        ids = np.empty(len(q), dtype=np.int64)
        pos = np.empty(len(q) if positions else 0, dtype=np.int64)
        self.k.find(_ptr(self.table), self.mask, _ptr(q), len(q), _ptr(ids), _ptr(pos) if positions else None)
        return ids, pos

    def fits(self, more: int) -> bool:
        """Whether ``more`` keys can be inserted without passing the load limit."""
        return (self.live + self.tombs + more) <= MAX_LOAD * len(self.table)

    def insert(self, q: np.ndarray, ids: np.ndarray) -> None:
        """Insert absent, distinct keys ``q`` with ``ids`` (the caller checked :meth:`fits`)."""
        q = np.ascontiguousarray(q, dtype=np.int64)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if self.k is None:
            reused = _np_insert(self.table, self.mask, q, ids)
        else:
            reused = int(self.k.insert(_ptr(self.table), self.mask, _ptr(q), _ptr(ids), len(q)))
        self.live += len(q)
        self.tombs -= reused
        self._prefault_next()

    def upsert(self, q: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ids of distinct keys ``q``, inserting the absent ones with ids ``cand`` in order.

        Returns ``(ids, created)``: ``created`` holds the positions in ``q`` of the keys
        inserted (the j-th got ``cand[j]``). The caller checked :meth:`fits` for ``len(q)``.
        """
        q = np.ascontiguousarray(q, dtype=np.int64)
        if self.k is None:
            ids = self.find(q, positions=False)[0]
            created = np.flatnonzero(ids < 0)
            ids[created] = cand[: len(created)]
            self.insert(q[created], ids[created])
            return ids, created
        cand = np.ascontiguousarray(cand, dtype=np.int64)
        ids = np.empty(len(q), dtype=np.int64)
        created = np.empty(len(q), dtype=np.int64)
        tombs = np.zeros(1, dtype=np.int64)
        args = (_ptr(q), len(q), _ptr(cand), _ptr(ids), _ptr(created), _ptr(tombs))
        n = int(self.k.upsert(_ptr(self.table), self.mask, *args))
        self.live += n
        self.tombs -= int(tombs[0])
        self._prefault_next()
        return ids, created[:n]

    @classmethod
    def of_keys(cls, keys: np.ndarray, k: _native.Kernels | None) -> tuple[HashIndex, bool]:
        """An index of distinct ``keys`` with ids ``0..n-1``, and whether they were distinct.

        With the C kernels two threads build it, each emptying and filling half of the slots
        (keys whose probe crosses into the other half are inserted after); a load's index
        is built while its rows are still being read.
        """
        n = len(keys)
        ids = np.arange(n, dtype=np.int64)
        if k is None:  # NumPy rounds probe a whole batch at once: repeats are found apart
            index = cls(n, k)
            if len(np.unique(keys)) != n:
                return index, False
            index.insert(keys, ids)
            return index, True
        if n < _BUILD_HALVES_FROM:  # the kernel inserts one key after another: it sees repeats
            index = cls(n, k)
            return index, len(index.upsert(keys, ids)[1]) == n
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        index = cls(n, k, fill=False)
        size = len(index.table)
        spills = [np.empty(_SPILL, dtype=np.int64) for _ in range(2)]
        outs = [np.zeros(2, dtype=np.int64) for _ in range(2)]
        made = [0, 0]

        def half(h: int) -> None:
            lo, hi = (0, size // 2) if h == 0 else (size // 2, size)
            made[h] = k.build(
                index.table.ctypes.data, index.mask, keys.ctypes.data, n, lo, hi,
                spills[h].ctypes.data, _SPILL, outs[h].ctypes.data,
            )  # fmt: skip

        both(half)
        if outs[0][1] < 0 or outs[1][1] < 0:  # too many keys crossed: one thread after all
            index = cls(n, k)
            return index, len(index.upsert(keys, ids)[1]) == n
        index.live = made[0] + made[1]
        late = np.concatenate([spills[h][: outs[h][1]] for h in range(2)])
        _, created = index.upsert(keys[late], late)
        return index, index.live == n and int(outs[0][0] + outs[1][0]) == 0 and len(created) == len(late)

    def erase(self, positions: np.ndarray) -> None:
        """Delete the entries at ``positions`` (from :meth:`find`; distinct, all live)."""
        self.table["id"][positions] = TOMB_ID
        self.live -= len(positions)
        self.tombs += len(positions)

    def double(self) -> bool:
        """Double the table in place with the C kernel; ``False`` where it cannot (then :meth:`reset`)."""
        if self.k is None:
            return False
        size = len(self.table)
        table = self._slots(2 * size)
        spill = np.empty(_SPILL, dtype=ENTRY)
        live = int(self.k.grow(_ptr(table), size, _ptr(spill), _SPILL))
        self.table, self.mask = table, 2 * size - 1
        if live != self.live:
            return False
        self.tombs = 0
        return True

    def reset(self, size: int) -> None:
        """Make the table ``size`` empty slots (the caller inserts every key again)."""
        self.table = self._slots(size)
        self.table.view(np.uint8).fill(0xFF)
        self.mask = size - 1
        self.live = self.tombs = 0
