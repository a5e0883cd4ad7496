"""One rank's shard of a dynamic embedding table: rows keyed by arbitrary int64 ids.

A row is created the first time its key is seen in training (after it passed the optional
admission counter), initialised from the key itself (:func:`init_rows`), so the initial
value never depends on arrival order or on the world size. At a capacity, rows with the
lowest eviction score make room (LRU: last-access clock; LFU: access count). Rows train
with row-wise Adagrad applied in place (FBGEMM's ``EXACT_ROWWISE_ADAGRAD`` update).

Every key whose row, optimizer row, score or counter changed since the last
:meth:`DynamicTable.clear_touched` is tracked, so an incremental checkpoint can store only
those rows.

Everything is a batch operation over arrays (see ``docs/dynamic.md``): rows live in
columns indexed by slot (:class:`reckpt.dynamic.index.KeyMap` over a vectorised hash
index), touched rows are a flag per slot, the admission counter and the evicted keys are
key maps of their own, and evictions are chosen by :class:`reckpt.dynamic.evict.Evictor`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from reckpt.dynamic.evict import Evictor
from reckpt.dynamic.index import KeyMap, kernels
from reckpt.dynamic.initial import init_rows, write_init
from reckpt.errors import ConfigError

__all__ = ["DynamicTable", "TableState", "init_rows", "EVICTION_POLICIES"]

EVICTION_POLICIES = ("lru", "lfu")


@dataclass
class TableState:
    """A copy of (part of) a table, sorted by key: what a dump writes and a load reads."""

    keys: torch.Tensor
    values: torch.Tensor
    opt_values: torch.Tensor
    scores: torch.Tensor
    counter_keys: torch.Tensor
    counter_freqs: torch.Tensor
    removed_keys: torch.Tensor | None = None


def _np(t: torch.Tensor | np.ndarray, dtype: Any = np.int64) -> np.ndarray:
    arr = t.numpy() if isinstance(t, torch.Tensor) else t
    return np.ascontiguousarray(arr, dtype=dtype)


def _distinct(keys: np.ndarray) -> np.ndarray | None:
    """``None`` when ``keys`` ascend strictly (the usual dump), else the positions of the distinct
    keys in key order, the last occurrence of a repeated key (it would overwrite the earlier)."""
    if len(keys) < 2 or bool(np.all(keys[1:] > keys[:-1])):
        return None
    _, first_of_reversed = np.unique(keys[::-1], return_index=True)
    out: np.ndarray = len(keys) - 1 - first_of_reversed
    return out


def _gather(col: torch.Tensor, ids: np.ndarray | slice) -> torch.Tensor:
    """``col[ids]`` as a new tensor."""
    if isinstance(ids, slice):
        return col[ids].clone()
    return col.index_select(0, torch.from_numpy(ids))


class DynamicTable:
    """Rows, optimizer rows, scores and admission counters of one shard (no communication).

    Args:
        dim: row width.
        capacity: most rows held (``None``: unbounded).
        eviction: ``"lru"`` or ``"lfu"``: the score that picks rows to evict at capacity.
        admit_threshold: occurrences a key needs before it gets a row (``<= 1``: at once).
        seed: initializer seed.
        init_bound: initial values are uniform in ``[-init_bound, init_bound)``.
    """

    def __init__(
        self,
        dim: int,
        *,
        capacity: int | None = None,
        eviction: str = "lru",
        admit_threshold: int = 0,
        seed: int = 0,
        init_bound: float = 0.0,
    ) -> None:
        if dim < 1:
            raise ConfigError(f"DynamicEmbedding: embedding_dim must be >= 1, got {dim}")
        if capacity is not None and capacity < 1:
            raise ConfigError(f"DynamicEmbedding: capacity must be >= 1 or None, got {capacity}")
        if eviction not in EVICTION_POLICIES:
            raise ConfigError(
                f"DynamicEmbedding: eviction must be one of {EVICTION_POLICIES}, got {eviction!r}"
            )
        self.dim, self.capacity, self.eviction = dim, capacity, eviction
        self.admit_threshold, self.seed = admit_threshold, seed
        self.init_bound = init_bound or dim**-0.5
        self.clock = 0
        self._k = kernels()
        self.removed = KeyMap({}, self._k)  # keys evicted since clear_touched (re-added ones leave)
        self._new_rows()

    def _new_rows(self) -> None:
        cols: dict[str, tuple[object, tuple[int, ...]]] = {
            "values": (np.float32, (self.dim,)),
            "opt": (np.float32, ()),
            "scores": (np.int64, ()),
        }
        self.rows = KeyMap(cols, self._k)
        self.counts = KeyMap({"freq": (np.int64, ())}, self._k)
        self.evictor = Evictor(self.rows)

    # -- storage (views by slot; free slots hold stale data) ----------------------------
    @property
    def keys(self) -> torch.Tensor:
        return self.rows.keys.t

    @property
    def values(self) -> torch.Tensor:
        return self.rows.cols["values"].t

    @property
    def opt(self) -> torch.Tensor:
        return self.rows.cols["opt"].t

    @property
    def scores(self) -> torch.Tensor:
        return self.rows.cols["scores"].t

    @property
    def slot_of(self) -> dict[int, int]:
        """``{key: slot}`` of every row, built anew on each access (for tests and debugging)."""
        ids = self.rows.live_ids()
        return dict(zip(self.rows.keys.np[ids].tolist(), ids.tolist(), strict=True))

    @property
    def counter(self) -> dict[int, int]:
        """``{key: count}`` of the keys not yet admitted, built anew on each access."""
        ids = self.counts.live_ids()
        return dict(
            zip(self.counts.keys.np[ids].tolist(), self.counts.cols["freq"].np[ids].tolist(), strict=True)
        )

    def __len__(self) -> int:
        return len(self.rows)

    def clear(self) -> None:
        """Drop every row and counter (and their touched marks; evicted keys stay recorded)."""
        self._new_rows()

    # -- training ----------------------------------------------------------------------
    def lookup(self, keys: torch.Tensor, counts: torch.Tensor | None, train: bool) -> torch.Tensor:
        """Slots of unique ``keys`` (-1: no row); in training, count, admit, score and evict.

        Args:
            keys: unique int64 keys owned by this shard.
            counts: occurrences of each key in the batch (for admission and LFU scores).
            train: create rows and update scores/counters; otherwise a pure read.
        """
        q = _np(keys)
        slots = self.rows.find(q)
        if not train:
            return torch.from_numpy(slots)
        self.clock += 1
        cnt = np.ones(len(q), dtype=np.int64) if counts is None else _np(counts)
        have = slots >= 0
        hs = slots[have]
        scores = self.rows.cols["scores"].np
        if self.eviction == "lru":
            if self.clock <= self.evictor.limit[0]:
                self.evictor.reset()  # a clock set back (by hand): a new score may be low
            scores[hs] = self.clock
        else:
            if len(cnt) and int(cnt.min()) < 0:
                self.evictor.reset()  # a score may drop: the pool no longer bounds the lowest
            scores[hs] += cnt[have]
        self.rows.touch(hs)
        fresh = np.flatnonzero(~have)
        if len(fresh):
            self._admit(q[fresh], cnt[fresh], fresh, slots, hs)
        return torch.from_numpy(slots)

    def _admit(
        self, fk: np.ndarray, fc: np.ndarray, at: np.ndarray, slots: np.ndarray, protect: np.ndarray
    ) -> None:
        """Count keys without a row; give rows to those at the threshold, as far as room allows."""
        counts = self.counts
        cid = counts.find(fk)
        has = cid >= 0
        freq = fc.copy()
        freq[has] += counts.cols["freq"].np[cid[has]]
        admit = np.flatnonzero(freq >= self.admit_threshold)
        fits = admit[: self._make_room(len(admit), protect)]
        stay = np.ones(len(fk), dtype=bool)
        stay[fits] = False  # not admitted, or no room even after eviction: counted, no row yet
        counts.remove(cid[fits[has[fits]]])
        keep = cid[stay & has]
        counts.cols["freq"].np[keep] = freq[stay & has]
        counts.touch(keep)
        new = np.flatnonzero(stay & ~has)
        if len(new):
            nid = counts.add(fk[new])
            counts.cols["freq"].np[nid] = freq[new]
            counts.touch(nid)
        if len(fits):
            slots[at[fits]] = self._insert(fk[fits], freq[fits])

    def _insert(self, keys: np.ndarray, freq: np.ndarray) -> np.ndarray:
        """New rows (initialised from their keys) for absent ``keys``; returns their slots."""
        if len(self.removed):
            back = self.removed.find(keys)
            self.removed.remove(back[back >= 0])
        ids = self.rows.add(keys)
        self.rows.touch(ids)
        self.rows.cols["scores"].np[ids] = freq if self.eviction == "lfu" else self.clock
        write_init(keys, ids, self.dim, self.seed, self.init_bound, self.rows.cols["values"].np)
        self.rows.cols["opt"].np[ids] = 0.0
        self.evictor.created(ids)
        return ids

    def _make_room(self, n: int, protect: np.ndarray) -> int:
        """Evict lowest-score rows (not in ``protect``) so that ``n`` new rows fit; returns how many fit."""
        if self.capacity is None or n == 0:
            return n
        excess = len(self.rows) + n - self.capacity
        if excess <= 0:
            return n
        self.evict(excess, protect)
        return max(0, min(n, self.capacity - len(self.rows)))

    def evict(self, n: int, protect: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
        """Remove the ``n`` rows of lowest score (ties: lowest key); returns their keys in that order.

        Ties go by key, never by slot, so that the choice does not depend on the order rows
        were created or restored in. ``protect``: slots (of live rows) that must stay.
        """
        guard = None if protect is None else _np(protect)
        n = min(n, len(self.rows) - (0 if guard is None else len(guard)))
        if n <= 0:
            return torch.empty(0, dtype=torch.int64)
        victims = self.evictor.choose(n, guard)
        keys = self.rows.keys.np[victims].copy()
        self.rows.remove(victims)
        self.removed.add(keys[self.removed.find(keys) < 0] if len(self.removed) else keys)
        return torch.from_numpy(keys)

    def adagrad(self, slots: torch.Tensor, grads: torch.Tensor, lr: float, eps: float) -> None:
        """Row-wise Adagrad on rows ``slots`` (unique; -1 entries skipped) with summed ``grads``."""
        keep = slots >= 0
        slots, grads = slots[keep], grads[keep]
        if len(slots) == 0:
            return
        opt, values = self.opt, self.values
        state = opt[slots] + grads.pow(2).mean(dim=1)
        opt[slots] = state
        values[slots] -= (lr / (state.sqrt() + eps)).unsqueeze(1) * grads

    # -- tracking and state ------------------------------------------------------------
    def export(self, keys: torch.Tensor | None = None) -> TableState:
        """A copy of the rows (all, or those of ``keys`` that exist) and counters, sorted by key."""
        rows, counts = self.rows, self.counts
        if keys is None:
            ids, cids = rows.live_ids(), counts.live_ids()
        else:
            q = _np(keys)
            ids, cids = rows.find(q), counts.find(q)
            ids, cids = ids[ids >= 0], cids[cids >= 0]
        rk = np.sort(rows.keys.np[ids])  # NumPy's vectorised sort: ~10x an argsort of int64
        ids = rows.find(rk)
        ck = np.sort(counts.keys.np[cids])
        cids = counts.find(ck)
        run = _run(ids)
        return TableState(
            keys=torch.from_numpy(rk),
            values=_gather(self.values, run),
            opt_values=_gather(self.opt, run),
            scores=_gather(self.scores, run),
            counter_keys=torch.from_numpy(ck),
            counter_freqs=torch.from_numpy(counts.cols["freq"].np[cids]),
        )

    def apply(self, st: TableState, *, load_optim: bool) -> None:
        """Insert or overwrite the rows and counters of ``st``; delete its removed keys.

        A key that gets a row leaves the counter, and a counted key loses its row, so the
        two stay disjoint whatever order deltas arrive in. Touched marks of rows that stay
        are kept; the caller clears them (a load does).
        """
        self.evictor.reset()
        rows, counts = self.rows, self.counts
        if st.removed_keys is not None and len(st.removed_keys):
            gone = np.unique(_np(st.removed_keys))
            rows.remove(_present(rows, gone))
            counts.remove(_present(counts, gone))
        if len(st.keys):
            pick = _distinct(_np(st.keys))
            k = _take(_np(st.keys), pick)
            ids: np.ndarray | slice = _run(_ids_for(rows, k))
            _put(self.rows.cols["values"].np, ids, st.values.numpy(), pick)
            _put(self.rows.cols["scores"].np, ids, _np(st.scores), pick)
            if load_optim:
                _put(self.rows.cols["opt"].np, ids, _np(st.opt_values, np.float32), pick)
            else:
                self.rows.cols["opt"].np[ids] = 0.0
            counts.remove(_present(counts, k))
        if len(st.counter_keys):
            pick = _distinct(_np(st.counter_keys))
            ck = _take(_np(st.counter_keys), pick)
            rows.remove(_present(rows, ck))
            cids = _run(_ids_for(counts, ck))  # may grow the columns: take their views after
            _put(counts.cols["freq"].np, cids, _np(st.counter_freqs), pick)
        if self.capacity is not None and len(self.rows) > self.capacity:
            self.evict(len(self.rows) - self.capacity)

    def touched_keys(self) -> torch.Tensor:
        rk = self.rows.keys.np[self.rows.touched_ids()]
        ck = self.counts.keys.np[self.counts.touched_ids()]
        return torch.from_numpy(np.sort(np.concatenate([rk, ck])))

    def removed_keys(self) -> torch.Tensor:
        gone = self.removed.keys.np[self.removed.live_ids()]
        return torch.from_numpy(np.sort(gone[self.rows.find(gone) < 0]))

    def clear_touched(self) -> None:
        self.rows.untouch_all()
        self.counts.untouch_all()
        self.removed = KeyMap({}, self._k)

    # -- copies (deepcopy, pickle): the state, not the reserved memory -------------------
    def __getstate__(self) -> dict[str, Any]:
        settings = {
            "capacity": self.capacity,
            "eviction": self.eviction,
            "admit_threshold": self.admit_threshold,
            "seed": self.seed,
            "init_bound": self.init_bound,
        }
        return {
            "dim": self.dim,
            "settings": settings,
            "clock": self.clock,
            "state": self.export(),
            "touched": self.touched_keys(),
            "removed": self.removed_keys(),
        }

    def __setstate__(self, doc: dict[str, Any]) -> None:
        self.__init__(doc["dim"], **doc["settings"])  # type: ignore[misc]
        self.apply(doc["state"], load_optim=True)
        self.clock = doc["clock"]
        touched = _np(doc["touched"])
        self.rows.touch(_present(self.rows, touched))
        self.counts.touch(_present(self.counts, touched))
        self.removed.add(_np(doc["removed"]))


def _present(m: KeyMap, keys: np.ndarray) -> np.ndarray:
    """Ids of those of (distinct) ``keys`` that ``m`` holds."""
    ids = m.find(keys)
    return ids[ids >= 0]


def _ids_for(m: KeyMap, keys: np.ndarray) -> np.ndarray:
    """Ids of distinct ``keys`` in ``m``, adding the missing ones."""
    if not len(m):
        return m.add(keys)
    ids = m.find(keys)
    miss = ids < 0
    if miss.any():
        ids[miss] = m.add(keys[miss])
    return ids


def _run(ids: np.ndarray) -> np.ndarray | slice:
    """``ids`` as a slice when they are one ascending run (a copy instead of a scatter)."""
    if len(ids) and ids[-1] - ids[0] == len(ids) - 1 and bool(np.all(ids[1:] > ids[:-1])):
        return slice(int(ids[0]), int(ids[0]) + len(ids))
    return ids


def _take(src: np.ndarray, pick: np.ndarray | None) -> np.ndarray:
    return src if pick is None else src[pick]


def _put(col: np.ndarray, ids: np.ndarray | slice, src: np.ndarray, pick: np.ndarray | None) -> None:
    """``col[ids] = src[pick]``."""
    col[ids] = _take(src, pick)
