"""Choosing rows to evict: the ``n`` lowest ``(score, key)`` pairs, as batch operations.

Scores only grow between two choices: LRU sets a row's score to the clock, LFU adds the
(positive) counts of the batch, and a new row is recorded as new. So the rows below a
threshold ``T`` can only be the ones that were below it when ``T`` was taken, plus rows
created since. :class:`Evictor` keeps that candidate pool: a full scan (in chunks, so it
never allocates per-row arrays of the whole table) selects the ``K`` lowest live rows,
``K`` about ``sqrt(rows * n)``; each later choice looks only at the pool and at the rows
created since, and scans again only when fewer than ``n`` of them are still below ``T``.
Anything that can lower a score (a load, ``clear``) calls :meth:`Evictor.reset`. The choice
is exactly the ``n`` lowest pairs among the live, unprotected rows, whatever the pool holds.
"""

from __future__ import annotations

import math

import numpy as np

from reckpt.dynamic.index import LIVE, KeyMap

__all__ = ["Evictor", "lowest"]

_CHUNK = 1 << 24
_PROTECT = np.uint8(4)


def lowest(ids: np.ndarray, scores: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` ids of lowest ``(scores[id], keys[id])`` (keys distinct), in that order."""
    if len(ids) > k:
        s = scores[ids]
        kth = np.partition(s, k - 1)[k - 1]
        below, ties = ids[s < kth], ids[s == kth]
        need = k - len(below)
        if need < len(ties):
            tk = keys[ties]
            ties = ties[tk <= np.partition(tk, need - 1)[need - 1]]
        ids = np.concatenate([below, ties])
    return ids[np.lexsort((keys[ids], scores[ids]))]


class Evictor:
    """The candidate pool of one table's rows (see the module docstring).

    Args:
        rows: the table's rows; ``rows.cols["scores"]`` holds the scores.
    """

    def __init__(self, rows: KeyMap) -> None:
        self.rows = rows
        self.reset()

    def reset(self) -> None:
        """Forget the pool (scores may have dropped)."""
        self.pool: np.ndarray | None = None
        self.limit = (0, 0)  # (score, key) of the pool's highest row
        self.since: list[np.ndarray] = []
        self.since_n = 0

    def created(self, ids: np.ndarray) -> None:
        """Record rows created (or given a new key) since the pool was taken."""
        if self.pool is None or not len(ids):
            return
        self.since.append(ids.copy())
        self.since_n += len(ids)
        if self.since_n > max(len(self.pool), len(self.rows) // 4):
            self.reset()  # cheaper to scan again than to carry them

    def choose(self, n: int, protect: np.ndarray | None) -> np.ndarray:
        """The ``n`` live rows of lowest ``(score, key)`` not in ``protect``, in that order.

        ``protect`` holds distinct live ids, and at least ``n`` other live rows exist.
        """
        flags = self.rows.flags.np
        guarded = 0 if protect is None else len(protect)
        if guarded:
            flags[protect] |= _PROTECT
        try:
            got = self._from_pool(n)
            if got is None:
                self._scan(n + guarded)
                got = self._from_pool(n)
        finally:
            if guarded:
                flags[protect] &= ~_PROTECT
        assert got is not None
        return got

    def _from_pool(self, n: int) -> np.ndarray | None:
        if self.pool is None:
            return None
        scores, keys = self.rows.cols["scores"].np, self.rows.keys.np
        flags = self.rows.flags.np
        cand = self.pool if not self.since else np.unique(np.concatenate([self.pool, *self.since]))
        cand = cand[(flags[cand] & LIVE).astype(bool)]
        s, k = scores[cand], keys[cand]
        ls, lk = self.limit
        cand = cand[(s < ls) | ((s == ls) & (k <= lk))]
        free = cand[(flags[cand] & _PROTECT) == 0]
        if len(free) < n:
            return None
        got = lowest(free, scores, keys, n)
        keep = np.ones(len(cand), dtype=bool)
        keep[np.searchsorted(cand, np.sort(got))] = False  # cand is sorted (unique / ascending pool)
        self.pool, self.since, self.since_n = cand[keep], [], 0
        return got

    def _scan(self, n: int) -> None:
        """Take the pool: the ``K >= n`` lowest live rows (protected ones included)."""
        rows = self.rows
        live_n = len(rows)
        k = min(live_n, max(2 * n, math.isqrt(live_n * max(n, 1)) + n, 1024))
        scores, keys, flags = rows.cols["scores"].np, rows.keys.np, rows.flags.np
        parts = []
        for start in range(0, rows.high, _CHUNK):
            ids = np.flatnonzero(flags[start : start + _CHUNK] & LIVE) + start
            parts.append(lowest(ids, scores, keys, k) if len(ids) > k else ids)
        best = lowest(np.concatenate(parts) if parts else np.empty(0, np.int64), scores, keys, k)
        self.pool = np.sort(best)
        self.limit = (int(scores[best[-1]]), int(keys[best[-1]])) if len(best) else (0, 0)
        self.since, self.since_n = [], 0
