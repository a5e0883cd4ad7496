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

import weakref
from typing import Any

import numpy as np
import torch

from reckpt.dynamic.admit import admits_all, lookup_admitting
from reckpt.dynamic.columns import empty_array
from reckpt.dynamic.evict import Evictor
from reckpt.dynamic.index import KeyMap, kernels
from reckpt.dynamic.initial import init_rows, write_init
from reckpt.dynamic.snapshot import Snapshot, Staging, find_gather
from reckpt.dynamic.state import (
    TableState,
    as_np,
    as_run,
    ids_for,
    last_of_each,
    present,
    put_rows,
    take,
)
from reckpt.errors import ConfigError

__all__ = ["DynamicTable", "TableState", "init_rows", "EVICTION_POLICIES"]

EVICTION_POLICIES = ("lru", "lfu")


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
        self._snaps: list[weakref.ref[Snapshot]] = []
        self._staging = Staging()  # a dump's buffers, kept for the next one
        self.removed = KeyMap({}, self._k)  # keys evicted since clear_touched (re-added ones leave)
        self._new_rows()

    def empty_maps(self) -> tuple[KeyMap, KeyMap]:
        """New, empty key maps for this table's rows and admission counter (for :meth:`adopt`)."""
        cols: dict[str, tuple[object, tuple[int, ...]]] = {
            "values": (np.float32, (self.dim,)),
            "opt": (np.float32, ()),
            "scores": (np.int64, ()),
        }
        return KeyMap(cols, self._k), KeyMap({"freq": (np.int64, ())}, self._k)

    def _new_rows(self) -> None:
        self.rows, self.counts = self.empty_maps()
        self.evictor = Evictor(self.rows)

    def adopt(self, rows: KeyMap, counts: KeyMap) -> None:
        """Replace every row and counter with key maps filled elsewhere (from :meth:`empty_maps`).

        A load reads a dump straight into new key maps and hands them over: no copy. The
        two must be disjoint (a key with a row is not counted); rows beyond the capacity are
        evicted, as :meth:`apply` would. Touched marks are whatever the maps carry.
        """
        self.rows, self.counts = rows, counts
        self._settle()  # snapshots of the previous maps keep reading them: they no longer change
        self.evictor = Evictor(self.rows)
        if self.capacity is not None and len(self.rows) > self.capacity:
            self.evict(len(self.rows) - self.capacity)

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

    def snapshot(self, touched: bool = False) -> Snapshot:
        """The rows and counters as they are now, copied only if the table changes before they are read.

        ``touched``: only the rows and counters changed since :meth:`clear_touched`, and the
        keys evicted since (``export(touched_keys())`` and :meth:`removed_keys`, copied late).
        Every change to the table first makes the copy (see :mod:`reckpt.dynamic.snapshot`);
        writes through the tensor views (:attr:`values` ...) bypass this: use the methods.
        """
        removed = self.removed_keys().numpy() if touched else None
        snap = Snapshot(self.rows, self.counts, removed, self._staging)
        self._snaps = [r for r in self._snaps if r() is not None]
        self._snaps.append(weakref.ref(snap))
        return snap

    def _settle(self) -> None:
        """Before a change: pending snapshots that read this table's key maps take their copy."""
        if not self._snaps:
            return
        snaps, self._snaps = self._snaps, []
        for ref in snaps:
            snap = ref()
            if snap is not None and snap.reads(self.rows, self.counts):
                snap.materialize()

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
        q = as_np(keys)
        if not train:
            return torch.from_numpy(self.rows.find(q))
        self._settle()
        self.clock += 1
        cnt = np.ones(len(q), dtype=np.int64) if counts is None else as_np(counts)
        if admits_all(self, cnt, len(q)):
            return torch.from_numpy(lookup_admitting(self, q, cnt))
        slots = self.rows.find(q)
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
        self._settle()
        guard = None if protect is None else as_np(protect)
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
        self._settle()
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
            return self._state_of(rows.live_ids(), counts.live_ids())
        q = as_np(keys)
        ids, cids = rows.find(q), counts.find(q)
        return self._state_of(ids[ids >= 0], cids[cids >= 0])

    def _state_of(self, ids: np.ndarray, cids: np.ndarray) -> TableState:
        """Rows ``ids`` and counter entries ``cids``, each sorted by key, copied."""
        rk = np.sort(self.rows.keys.np[ids])  # NumPy's vectorised sort: ~10x an argsort of int64
        ck = np.sort(self.counts.keys.np[cids])
        n = len(rk)
        rows = {
            "values": empty_array((n, self.dim), np.float32),
            "opt": empty_array((n,), np.float32),
            "scores": empty_array((n,), np.int64),
        }
        find_gather(self.rows, rk, rows)
        freq = empty_array((len(ck),), np.int64)
        find_gather(self.counts, ck, {"freq": freq})
        return TableState(
            keys=torch.from_numpy(rk),
            values=torch.from_numpy(rows["values"]),
            opt_values=torch.from_numpy(rows["opt"]),
            scores=torch.from_numpy(rows["scores"]),
            counter_keys=torch.from_numpy(ck),
            counter_freqs=torch.from_numpy(freq),
        )

    def apply(self, st: TableState, *, load_optim: bool) -> None:
        """Insert or overwrite the rows and counters of ``st``; delete its removed keys.

        A key that gets a row leaves the counter, and a counted key loses its row, so the
        two stay disjoint whatever order deltas arrive in. Touched marks of rows that stay
        are kept; the caller clears them (a load does).
        """
        self._settle()
        self.evictor.reset()
        rows, counts = self.rows, self.counts
        if st.removed_keys is not None and len(st.removed_keys):
            gone = np.unique(as_np(st.removed_keys))
            rows.remove(present(rows, gone))
            counts.remove(present(counts, gone))
        if len(st.keys):
            pick = last_of_each(as_np(st.keys))
            k = take(as_np(st.keys), pick)
            ids: np.ndarray | slice = as_run(ids_for(rows, k))
            put_rows(self.rows.cols["values"].np, ids, st.values.numpy(), pick)
            put_rows(self.rows.cols["scores"].np, ids, as_np(st.scores), pick)
            if load_optim:
                put_rows(self.rows.cols["opt"].np, ids, as_np(st.opt_values, np.float32), pick)
            else:
                self.rows.cols["opt"].np[ids] = 0.0
            counts.remove(present(counts, k))
        if len(st.counter_keys):
            pick = last_of_each(as_np(st.counter_keys))
            ck = take(as_np(st.counter_keys), pick)
            rows.remove(present(rows, ck))
            cids = as_run(ids_for(counts, ck))  # may grow the columns: take their views after
            put_rows(counts.cols["freq"].np, cids, as_np(st.counter_freqs), pick)
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
        touched = as_np(doc["touched"])
        self.rows.touch(present(self.rows, touched))
        self.counts.touch(present(self.counts, touched))
        self.removed.add(as_np(doc["removed"]))
