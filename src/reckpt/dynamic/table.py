"""One rank's shard of a dynamic embedding table: rows keyed by arbitrary int64 ids.

A row is created the first time its key is seen in training (after it passed the optional
admission counter), initialised from the key itself (:func:`init_rows`), so the initial
value never depends on arrival order or on the world size. At a capacity, rows with the
lowest eviction score make room (LRU: last-access clock; LFU: access count). Rows train
with row-wise Adagrad applied in place (FBGEMM's ``EXACT_ROWWISE_ADAGRAD`` update).

Every key whose row, optimizer row, score or counter changed since the last
:meth:`DynamicTable.clear_touched` is tracked, so an incremental checkpoint can store only
those rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from reckpt.errors import ConfigError

__all__ = ["DynamicTable", "TableState", "init_rows", "EVICTION_POLICIES"]

EVICTION_POLICIES = ("lru", "lfu")

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 (wrapping arithmetic)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    out: np.ndarray = x ^ (x >> np.uint64(31))
    return out


def init_rows(keys: torch.Tensor, dim: int, seed: int, bound: float) -> torch.Tensor:
    """Initial rows of ``keys``: uniform in ``[-bound, bound)``, a pure function of (seed, key, column).

    Example:
        >>> a = init_rows(torch.tensor([7, 3]), 4, seed=0, bound=0.5)
        >>> torch.equal(a[0], init_rows(torch.tensor([7]), 4, seed=0, bound=0.5)[0])
        True
    """
    with np.errstate(over="ignore"):
        k = keys.numpy().astype(np.int64).view(np.uint64)
        base = _splitmix64(k ^ _splitmix64(np.array([seed], dtype=np.int64).view(np.uint64)))
        cols = np.arange(dim, dtype=np.uint64)
        h = _splitmix64(base[:, None] * _GOLDEN + cols[None, :])
    unit = (h >> np.uint64(40)).astype(np.float64) / float(1 << 24)  # 24 bits: exact in float32
    return torch.from_numpy(((unit * 2.0 - 1.0) * bound).astype(np.float32)).reshape(len(keys), dim)


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


def _sorted(keys: list[int]) -> torch.Tensor:
    return torch.tensor(sorted(keys), dtype=torch.int64)


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
        self.slot_of: dict[int, int] = {}
        self.counter: dict[int, int] = {}
        self.touched: set[int] = set()
        self.removed: set[int] = set()
        self._free: list[int] = []
        self._alloc(0)

    # -- storage -----------------------------------------------------------------------
    def _alloc(self, n: int) -> None:
        self.keys = torch.zeros(n, dtype=torch.int64)
        self.values = torch.zeros(n, self.dim)
        self.opt = torch.zeros(n)
        self.scores = torch.zeros(n, dtype=torch.int64)
        self._free = list(range(n - 1, -1, -1))

    def _grow(self, need: int) -> None:
        old = len(self.keys)
        new = max(need + old, 2 * old, 64)
        if self.capacity is not None:
            new = max(min(new, self.capacity), old + need)
        self.keys = torch.cat([self.keys, torch.zeros(new - old, dtype=torch.int64)])
        self.values = torch.cat([self.values, torch.zeros(new - old, self.dim)])
        self.opt = torch.cat([self.opt, torch.zeros(new - old)])
        self.scores = torch.cat([self.scores, torch.zeros(new - old, dtype=torch.int64)])
        self._free.extend(range(new - 1, old - 1, -1))

    def __len__(self) -> int:
        return len(self.slot_of)

    def clear(self) -> None:
        """Drop every row and counter (tracking is left to the caller)."""
        self.slot_of.clear()
        self.counter.clear()
        self._alloc(0)

    # -- training ----------------------------------------------------------------------
    def lookup(self, keys: torch.Tensor, counts: torch.Tensor | None, train: bool) -> torch.Tensor:
        """Slots of unique ``keys`` (-1: no row); in training, count, admit, score and evict.

        Args:
            keys: unique int64 keys owned by this shard.
            counts: occurrences of each key in the batch (for admission and LFU scores).
            train: create rows and update scores/counters; otherwise a pure read.
        """
        key_list = keys.tolist()
        get = self.slot_of.get
        slots = torch.tensor([get(k, -1) for k in key_list], dtype=torch.int64)
        if not train:
            return slots
        self.clock += 1
        cnt = counts if counts is not None else torch.ones(len(key_list), dtype=torch.int64)
        have = slots >= 0
        if self.eviction == "lru":
            self.scores[slots[have]] = self.clock
        else:
            self.scores[slots[have]] += cnt[have]
        self.touched.update(key_list)
        count_list = cnt.tolist()
        fresh: list[tuple[int, int, int]] = []  # (position, key, counted frequency)
        for i in (~have).nonzero().squeeze(1).tolist():
            k = key_list[i]
            freq = self.counter.get(k, 0) + count_list[i]
            if freq < self.admit_threshold:
                self.counter[k] = freq
            else:
                self.counter.pop(k, None)
                fresh.append((i, k, freq))
        if fresh:
            room = self._make_room(len(fresh), protect=slots[have])
            for _, k, freq in fresh[room:]:  # no room even after eviction: counted, no row yet
                self.counter[k] = freq
            self._insert(slots, fresh[:room])
        return slots

    def _insert(self, slots: torch.Tensor, fresh: list[tuple[int, int, int]]) -> None:
        """New rows (initialised from their keys) for ``(position, key, frequency)``; fills ``slots``."""
        if not fresh:
            return
        if len(self._free) < len(fresh):
            self._grow(len(fresh) - len(self._free))
        new_keys = [k for _, k, _ in fresh]
        new_slots = [self._free.pop() for _ in fresh]
        self.slot_of.update(zip(new_keys, new_slots, strict=True))
        self.removed.difference_update(new_keys)
        idx = torch.tensor(new_slots, dtype=torch.int64)
        key_t = torch.tensor(new_keys, dtype=torch.int64)
        slots[torch.tensor([i for i, _, _ in fresh], dtype=torch.int64)] = idx
        self.keys[idx] = key_t
        lfu = torch.tensor([f for _, _, f in fresh], dtype=torch.int64)
        self.scores[idx] = lfu if self.eviction == "lfu" else torch.full_like(lfu, self.clock)
        self.values[idx] = init_rows(key_t, self.dim, self.seed, self.init_bound)
        self.opt[idx] = 0.0

    def _make_room(self, n: int, protect: torch.Tensor) -> int:
        """Evict lowest-score rows (not in ``protect``) so that ``n`` new rows fit; returns how many fit."""
        if self.capacity is None:
            return n
        excess = len(self.slot_of) + n - self.capacity
        if excess <= 0:
            return n
        self.evict(excess, protect)
        return min(n, self.capacity - len(self.slot_of))

    def evict(self, n: int, protect: torch.Tensor | None = None) -> list[int]:
        """Remove the ``n`` rows of lowest score (ties: lowest key); returns their keys.

        Ties go by key, never by slot, so that the choice does not depend on the order rows
        were created or restored in.
        """
        used = torch.tensor(list(self.slot_of.values()), dtype=torch.int64)
        if protect is not None and len(protect):
            used = used[~torch.isin(used, protect)]
        n = min(n, len(used))
        if n <= 0:
            return []
        scores = self.scores[used]
        cand = used[scores <= torch.kthvalue(scores, n).values]
        order = np.lexsort((self.keys[cand].numpy(), self.scores[cand].numpy()))[:n]
        victims = [int(k) for k in self.keys[cand[torch.from_numpy(order)]].tolist()]
        for k in victims:
            self._free.append(self.slot_of.pop(k))
            self.touched.discard(k)
            self.removed.add(k)
        return victims

    def adagrad(self, slots: torch.Tensor, grads: torch.Tensor, lr: float, eps: float) -> None:
        """Row-wise Adagrad on rows ``slots`` (unique; -1 entries skipped) with summed ``grads``."""
        keep = slots >= 0
        slots, grads = slots[keep], grads[keep]
        if len(slots) == 0:
            return
        state = self.opt[slots] + grads.pow(2).mean(dim=1)
        self.opt[slots] = state
        self.values[slots] -= (lr / (state.sqrt() + eps)).unsqueeze(1) * grads

    # -- tracking and state ------------------------------------------------------------
    def export(self, keys: torch.Tensor | None = None) -> TableState:
        """A copy of the rows (all, or those of ``keys`` that exist) and counters, sorted by key."""
        if keys is None:
            wanted = sorted(self.slot_of)
            counted = sorted(self.counter)
        else:
            ks = keys.tolist()
            wanted = sorted(k for k in ks if k in self.slot_of)
            counted = sorted(k for k in ks if k in self.counter)
        slots = torch.tensor([self.slot_of[k] for k in wanted], dtype=torch.int64)
        return TableState(
            keys=torch.tensor(wanted, dtype=torch.int64),
            values=self.values[slots].clone(),
            opt_values=self.opt[slots].clone(),
            scores=self.scores[slots].clone(),
            counter_keys=torch.tensor(counted, dtype=torch.int64),
            counter_freqs=torch.tensor([self.counter[k] for k in counted], dtype=torch.int64),
        )

    def apply(self, st: TableState, *, load_optim: bool) -> None:
        """Insert or overwrite the rows and counters of ``st``; delete its removed keys.

        A key that gets a row leaves the counter, and a counted key loses its row, so the
        two stay disjoint whatever order deltas arrive in.
        """
        for k in (st.removed_keys if st.removed_keys is not None else torch.empty(0)).tolist():
            slot = self.slot_of.pop(int(k), None)
            if slot is not None:
                self._free.append(slot)
            self.counter.pop(int(k), None)
        n = len(st.keys)
        if n:
            key_list = st.keys.tolist()
            missing = sum(1 for k in key_list if k not in self.slot_of)
            if len(self._free) < missing:
                self._grow(missing - len(self._free))
            slots = torch.tensor(
                [self.slot_of[k] if k in self.slot_of else self._claim(k) for k in key_list],
                dtype=torch.int64,
            )
            self.keys[slots] = st.keys
            self.values[slots] = st.values
            self.scores[slots] = st.scores
            self.opt[slots] = st.opt_values if load_optim else torch.zeros(n)
            for k in key_list:
                self.counter.pop(k, None)
        for k, f in zip(st.counter_keys.tolist(), st.counter_freqs.tolist(), strict=True):
            slot = self.slot_of.pop(k, None)
            if slot is not None:
                self._free.append(slot)
            self.counter[k] = f
        if self.capacity is not None and len(self.slot_of) > self.capacity:
            self.evict(len(self.slot_of) - self.capacity)

    def _claim(self, key: int) -> int:
        slot = self._free.pop()
        self.slot_of[key] = slot
        return slot

    def touched_keys(self) -> torch.Tensor:
        return _sorted([k for k in self.touched if k in self.slot_of or k in self.counter])

    def removed_keys(self) -> torch.Tensor:
        return _sorted([k for k in self.removed if k not in self.slot_of])

    def clear_touched(self) -> None:
        self.touched.clear()
        self.removed.clear()
