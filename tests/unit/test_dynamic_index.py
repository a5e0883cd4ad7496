"""The dynamic tables' vectorised parts: hash index, key maps, columns, initial rows, eviction choice.

Every check runs on the NumPy path and, where a C compiler built them, on the C kernels.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

from reckpt.dynamic import columns, index
from reckpt.dynamic.columns import Column
from reckpt.dynamic.evict import Evictor, lowest
from reckpt.dynamic.index import LIVE, HashIndex, KeyMap, kernels
from reckpt.dynamic.initial import init_rows, write_init
from reckpt.dynamic.table import DynamicTable, TableState

PATHS = ["numpy", "c"]


def path_kernels(path: str) -> index._native.Kernels | None:
    if path == "numpy":
        return None
    k = kernels()
    if k is None:
        pytest.skip("no C kernels on this machine (no compiler)")
    return k


@pytest.mark.parametrize("path", PATHS)
def test_key_map_agrees_with_a_dict_through_growth_removal_and_rebuilds(path: str) -> None:
    k = path_kernels(path)
    rng = np.random.default_rng(0)
    m = KeyMap({"v": (np.float32, (3,))}, k)
    ref: dict[int, int] = {}
    space = rng.integers(-(1 << 62), 1 << 62, 20_000)
    for step in range(40):
        batch = np.unique(rng.choice(space, 700))
        ids = m.find(batch)
        assert ids.tolist() == [ref.get(int(x), -1) for x in batch.tolist()]
        new = batch[ids < 0]
        for key, i in zip(new.tolist(), m.add(new).tolist(), strict=True):
            assert i not in ref.values()
            ref[key] = i
        if step % 3 == 2:  # remove a third: tombstones, then free ids reused
            gone = rng.choice(np.array(sorted(ref)), len(ref) // 3, replace=False)
            m.remove(m.find(gone))
            for key in gone.tolist():
                del ref[key]
        assert len(m) == len(ref)
        assert sorted(m.keys.np[m.live_ids()].tolist()) == sorted(ref)
    assert m.high < 20_000  # freed ids were reused
    probe = np.concatenate([np.array(sorted(ref)), space[:500] + 1])
    assert m.find(probe).tolist() == [ref.get(int(x), -1) for x in probe.tolist()]


def test_each_path_reads_the_table_the_other_built() -> None:
    k = path_kernels("c")
    keys = np.unique(np.random.default_rng(1).integers(-(1 << 40), 1 << 40, 5000))
    ids = np.arange(len(keys), dtype=np.int64)
    for builder, reader in ((None, k), (k, None)):
        built = HashIndex(len(keys), builder)
        built.insert(keys, ids)
        got, pos = HashIndex.over(built.table, reader).find(np.concatenate([keys, keys + 1]))
        assert got.tolist() == ids.tolist() + [-1] * len(keys)
        assert (pos[: len(keys)] >= 0).all() and (pos[len(keys) :] == -1).all()


@pytest.mark.parametrize("dim", [1, 3, 16, 33])
@pytest.mark.parametrize("seed", [0, -5, 1 << 40])
def test_initial_rows_have_the_same_bits_on_both_paths(dim: int, seed: int) -> None:
    path_kernels("c")
    keys = np.concatenate(
        [
            np.random.default_rng(dim).integers(-(1 << 63), (1 << 63) - 1, 500),
            [0, -1, (1 << 63) - 1, -(1 << 63)],
        ]
    )
    a = np.zeros((len(keys) + 7, dim), np.float32)
    b = np.zeros_like(a)
    slots = np.random.default_rng(2).permutation(len(a))[: len(keys)]
    write_init(keys, slots, dim, seed, 0.37, a)
    write_init(keys, slots, dim, seed, 0.37, b, use_kernels=False)
    assert np.array_equal(a.view(np.int32), b.view(np.int32))
    assert np.array_equal(init_rows(torch.from_numpy(keys), dim, seed, 0.37).numpy(), a[slots])


def test_columns_grow_in_place_and_fall_back_to_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    c = Column(np.int64)
    c.resize(10)
    c.np[:] = np.arange(10)
    view = c.t
    c.resize(5000)
    assert c.reserved and c.np[:10].tolist() == list(range(10)) and not c.np[10:].any()
    assert view.data_ptr() == c.t.data_ptr()  # grown without moving
    monkeypatch.setattr(columns, "_reserve", lambda *a, **k: None)
    d = Column(np.float32, (4,))
    assert not d.reserved
    d.resize(3)
    d.np[:] = 1.5
    d.resize(3000)
    assert (d.np[:3] == 1.5).all() and not d.np[3:].any() and d.t.shape == (3000, 4)


def brute_lowest(scores: np.ndarray, keys: np.ndarray, live: np.ndarray, n: int) -> list[int]:
    pairs = sorted((int(scores[i]), int(keys[i]), int(i)) for i in live)
    return [i for _, _, i in pairs[:n]]


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_eviction_choice_is_the_n_lowest_score_then_key(policy: str) -> None:
    rng = np.random.default_rng(3)
    m = KeyMap({"scores": (np.int64, ())}, kernels())
    ev = Evictor(m)
    for clock in range(1, 31):
        new = np.unique(rng.integers(-(10**9), 10**9, 300))
        new = new[m.find(new) < 0]
        ids = m.add(new)
        scores = m.cols["scores"].np
        scores[ids] = clock if policy == "lru" else rng.integers(1, 4, len(ids))
        ev.created(ids)
        live = m.live_ids()
        hit = rng.choice(live, len(live) // 5, replace=False)  # this batch's rows: scores only grow
        scores[hit] = clock if policy == "lru" else scores[hit] + rng.integers(1, 3, len(hit))
        protect = hit[: len(hit) // 2]
        n = int(rng.integers(1, 200))
        want = brute_lowest(scores, m.keys.np, np.setdiff1d(live, protect), n)
        got = ev.choose(n, protect)
        assert got.tolist() == want
        assert not (m.flags.np & ~LIVE).any()  # the protect marks are gone
        m.remove(got)
    ids = np.arange(12)
    assert lowest(ids, np.zeros(12, np.int64), -ids, 3).tolist() == [11, 10, 9]


def test_table_copies_carry_rows_counters_tracking_and_clock() -> None:
    t = DynamicTable(4, capacity=50, eviction="lfu", admit_threshold=2, seed=7)
    rng = np.random.default_rng(4)
    for _ in range(12):
        keys = torch.from_numpy(np.unique(rng.integers(0, 120, 30)))
        t.lookup(keys, torch.ones(len(keys), dtype=torch.int64), True)
    assert len(t.removed_keys()) and len(t.counter)
    for other in (copy.deepcopy(t), pickle.loads(pickle.dumps(t))):
        for f in ("keys", "values", "opt_values", "scores", "counter_keys", "counter_freqs"):
            assert torch.equal(getattr(other.export(), f), getattr(t.export(), f)), f
        assert torch.equal(other.touched_keys(), t.touched_keys())
        assert torch.equal(other.removed_keys(), t.removed_keys())
        assert (other.clock, other.capacity, other.eviction, other.seed) == (t.clock, 50, "lfu", 7)


def test_apply_takes_the_last_of_repeated_keys_and_keeps_rows_and_counters_apart() -> None:
    t = DynamicTable(2)
    one = torch.ones(2)
    st = TableState(
        keys=torch.tensor([5, 3, 5]),
        values=torch.stack([one, 2 * one, 3 * one]),
        opt_values=torch.tensor([0.1, 0.2, 0.3]),
        scores=torch.tensor([1, 2, 3]),
        counter_keys=torch.tensor([9, 3]),
        counter_freqs=torch.tensor([4, 1]),
    )
    t.apply(st, load_optim=True)
    got = t.export()
    assert got.keys.tolist() == [5] and got.values.tolist() == [[3.0, 3.0]] and got.scores.tolist() == [3]
    assert t.counter == {3: 1, 9: 4}


def test_kernels_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index, "_KERNELS", [])
    monkeypatch.setenv("RECKPT_DYNAMIC_KERNELS", "0")
    assert kernels() is None
    t = DynamicTable(3)
    t.lookup(torch.tensor([1, 2]), None, True)
    assert t._k is None and sorted(t.slot_of) == [1, 2]


@pytest.mark.parametrize("path", PATHS)
def test_upsert_hands_out_the_ids_add_would_in_one_probe(path: str) -> None:
    k = path_kernels(path)
    rng = np.random.default_rng(7)
    a, b = KeyMap({"v": (np.float32, ())}, k), KeyMap({"v": (np.float32, ())}, k)
    for step in range(30):
        q = np.unique(rng.integers(-3000, 3000, 400))
        free_before = a.n_free
        ids, created, reused = a.upsert(q)
        want = b.find(q)
        fresh = np.flatnonzero(want < 0)
        want[fresh] = b.add(q[fresh])
        assert ids.tolist() == want.tolist() and created.tolist() == fresh.tolist()
        assert reused == min(len(created), free_before)  # freed ids first
        if step % 4 == 3:
            live = a.live_ids()
            gone = rng.choice(live, len(live) // 3, replace=False)
            a.remove(gone)
            b.remove(gone)
        assert len(a) == len(b) and a.high == b.high


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("spill", [1 << 16, 0])
def test_an_index_built_in_halves_finds_every_key_and_repeats(
    path: str, spill: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reckpt.dynamic import hashindex

    k = path_kernels(path)
    monkeypatch.setattr(hashindex, "_BUILD_HALVES_FROM", 1000)
    monkeypatch.setattr(hashindex, "_SPILL", spill)  # 0: the halves give up, one thread builds it
    keys = np.unique(np.random.default_rng(9).integers(-(1 << 62), 1 << 62, 50_000))
    np.random.default_rng(1).shuffle(keys)
    index, distinct = HashIndex.of_keys(keys, k)
    assert distinct and index.live == len(keys)
    assert index.find(keys)[0].tolist() == list(range(len(keys)))
    assert (index.find(keys + 1)[0] == -1).sum() >= len(keys) - 1
    _, distinct = HashIndex.of_keys(np.concatenate([keys, keys[:3]]), k)
    assert not distinct
