"""The vectorised dynamic table against a plain per-key reference, on a random workload.

The reference below is the table's specification written the obvious way (dicts and sets,
one key at a time). Both must agree bitwise, step by step, on rows, optimizer rows, scores,
counters, the rows chosen for eviction, the touched and removed keys, and deltas applied to
a replica; on the NumPy path and on the C kernels. A dump written in the documented layout
(what the table before the vectorised index wrote) loads into the new table exactly.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from reckpt.dynamic import DynamicEmbedding, _native, index, load_dynamic
from reckpt.dynamic.table import DynamicTable

MASK = (1 << 64) - 1
GOLDEN, M1, M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def smix(x: int) -> int:
    x = (x + GOLDEN) & MASK
    x = ((x ^ (x >> 30)) * M1) & MASK
    x = ((x ^ (x >> 27)) * M2) & MASK
    return x ^ (x >> 31)


def ref_init(key: int, dim: int, seed: int, bound: float) -> np.ndarray:
    base = smix((key & MASK) ^ smix(seed & MASK))
    unit = [(smix((base * GOLDEN + c) & MASK) >> 40) / float(1 << 24) for c in range(dim)]
    return np.array([(u * 2.0 - 1.0) * bound for u in unit], dtype=np.float32)


class Reference:
    """The table's rules, one key at a time."""

    def __init__(self, dim: int, capacity: int | None, eviction: str, admit: int, seed: int) -> None:
        self.dim, self.capacity, self.eviction, self.admit, self.seed = dim, capacity, eviction, admit, seed
        self.bound = dim**-0.5
        self.rows: dict[int, list[Any]] = {}  # key -> [value, opt, score]
        self.counter: dict[int, int] = {}
        self.touched: set[int] = set()
        self.removed: set[int] = set()
        self.clock = 0
        self.victims: list[int] = []

    def lookup(self, keys: list[int], counts: list[int]) -> list[bool]:
        self.clock += 1
        present = [k for k in keys if k in self.rows]
        for k, c in zip(keys, counts, strict=True):
            if k in self.rows:
                self.rows[k][2] = self.clock if self.eviction == "lru" else self.rows[k][2] + c
        self.touched.update(keys)
        admitted = []
        for k, c in zip(keys, counts, strict=True):
            if k not in self.rows:
                freq = self.counter.pop(k, 0) + c
                if freq < self.admit:
                    self.counter[k] = freq
                else:
                    admitted.append((k, freq))
        room = len(admitted)
        if self.capacity is not None and len(self.rows) + room > self.capacity:
            self.evict(len(self.rows) + room - self.capacity, set(present))
            room = max(0, min(room, self.capacity - len(self.rows)))
        for k, freq in admitted[room:]:
            self.counter[k] = freq
        for k, freq in admitted[:room]:
            score = freq if self.eviction == "lfu" else self.clock
            self.rows[k] = [ref_init(k, self.dim, self.seed, self.bound), np.float32(0.0), score]
            self.removed.discard(k)
        return [k in self.rows for k in keys]

    def evict(self, n: int, protect: set[int]) -> None:
        order = sorted((row[2], k) for k, row in self.rows.items() if k not in protect)
        for _, k in order[:n]:
            del self.rows[k]
            self.touched.discard(k)
            self.removed.add(k)
            self.victims.append(k)

    def adagrad(self, keys: list[int], grads: torch.Tensor, lr: float, eps: float) -> None:
        have = [i for i, k in enumerate(keys) if k in self.rows]
        if not have:
            return
        # the same float32 tensor expression as the table, over these rows in this order
        g = grads[have]
        opt = torch.tensor([float(self.rows[keys[i]][1]) for i in have], dtype=torch.float32)
        val = torch.from_numpy(np.stack([self.rows[keys[i]][0] for i in have]))
        state = opt + g.pow(2).mean(dim=1)
        val = val - (lr / (state.sqrt() + eps)).unsqueeze(1) * g
        for j, i in enumerate(have):
            self.rows[keys[i]][0], self.rows[keys[i]][1] = val[j].numpy().copy(), state[j].numpy().copy()

    def state(self) -> dict[str, Any]:
        ks = sorted(self.rows)
        return {
            "keys": ks,
            "values": np.stack([self.rows[k][0] for k in ks]) if ks else np.zeros((0, self.dim), np.float32),
            "opt_values": np.array([self.rows[k][1] for k in ks], dtype=np.float32),
            "scores": [int(self.rows[k][2]) for k in ks],
            "counter_keys": sorted(self.counter),
            "counter_freqs": [self.counter[k] for k in sorted(self.counter)],
        }

    def touched_keys(self) -> list[int]:
        return sorted(k for k in self.touched if k in self.rows or k in self.counter)

    def removed_keys(self) -> list[int]:
        return sorted(k for k in self.removed if k not in self.rows)


def same(table: DynamicTable, ref: Reference) -> None:
    got, want = table.export(), ref.state()
    assert got.keys.tolist() == want["keys"]
    assert np.array_equal(got.values.numpy().view(np.int32), want["values"].view(np.int32))
    assert np.array_equal(got.opt_values.numpy().view(np.int32), want["opt_values"].view(np.int32))
    assert got.scores.tolist() == want["scores"]
    assert got.counter_keys.tolist() == want["counter_keys"]
    assert got.counter_freqs.tolist() == want["counter_freqs"]
    assert table.touched_keys().tolist() == ref.touched_keys()
    assert table.removed_keys().tolist() == ref.removed_keys()


def replica_equal(a: DynamicTable, b: DynamicTable) -> None:
    x, y = a.export(), b.export()
    for f in ("keys", "values", "opt_values", "scores", "counter_keys", "counter_freqs"):
        assert torch.equal(getattr(x, f), getattr(y, f)), f


@pytest.fixture(params=["numpy", "c"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "numpy":
        monkeypatch.setattr(index, "_KERNELS", [None])
    elif index.kernels() is None:
        pytest.skip("no C kernels on this machine (no compiler)")
    return str(request.param)


@pytest.mark.parametrize(
    ("eviction", "capacity", "admit"), [("lru", 900, 0), ("lfu", 700, 2), ("lru", None, 3), ("lfu", 400, 0)]
)
def test_random_workload_matches_the_reference_bitwise(
    path: str, eviction: str, capacity: int | None, admit: int
) -> None:
    dim, seed = 6, 11
    table = DynamicTable(dim, capacity=capacity, eviction=eviction, admit_threshold=admit, seed=seed)
    replica = DynamicTable(dim, capacity=capacity, eviction=eviction, admit_threshold=admit, seed=seed)
    ref = Reference(dim, capacity, eviction, admit, seed)
    victims: list[int] = []
    evict = table.evict
    table.evict = lambda n, protect=None: victims.extend((out := evict(n, protect)).tolist()) or out  # type: ignore[method-assign]
    rng = np.random.default_rng(hash((eviction, capacity, admit)) % 1000)
    hot = rng.integers(-(1 << 62), 1 << 62, 300)
    for step in range(50):
        ids = np.concatenate(
            [rng.choice(hot, 400), rng.integers(-(1 << 62), 1 << 62, 200), rng.integers(0, 2000, 300)]
        )
        uniq, counts = torch.unique(torch.from_numpy(ids), return_counts=True)
        slots = table.lookup(uniq, counts, True)
        has = ref.lookup(uniq.tolist(), counts.tolist())
        assert (slots >= 0).tolist() == has
        assert victims == ref.victims
        grads = torch.from_numpy(rng.standard_normal((len(uniq), dim)).astype(np.float32))
        table.adagrad(slots, grads, 0.05, 1e-8)
        ref.adagrad(uniq.tolist(), grads, 0.05, 1e-8)
        assert torch.equal(table.lookup(uniq, None, False), slots)
        same(table, ref)
        if step % 7 == 6:  # an incremental checkpoint: touched rows + removed keys onto the replica
            st = table.export(table.touched_keys())
            st.removed_keys = table.removed_keys()
            replica.apply(st, load_optim=True)
            replica_equal(replica, table)
            table.clear_touched()
            ref.touched.clear()
            ref.removed.clear()
    assert len(ref.victims) > 100 or capacity is None


def write_layout(folder: Path, name: str, st: dict[str, Any]) -> None:
    """A dump in the documented dynamicemb/ layout (raw little-endian), as the per-key table wrote it."""
    folder.mkdir(parents=True)
    files = {
        "emb_keys": np.array(st["keys"], "<i8"),
        "emb_values": st["values"].astype("<f4"),
        "emb_scores": np.array(st["scores"], "<i8"),
        "emb_opt_values": st["opt_values"].astype("<f4"),
        "counter_keys": np.array(st["counter_keys"], "<i8"),
        "counter_frequencies": np.array(st["counter_freqs"], "<i8"),
    }
    for kind, arr in files.items():
        (folder / f"{name}_{kind}.rank_0.world_size_1").write_bytes(arr.tobytes())


def test_a_dump_of_the_documented_layout_loads_exactly(tmp_path: Path) -> None:
    ref = Reference(4, 300, "lfu", 2, 0)
    rng = np.random.default_rng(5)
    for _ in range(20):
        uniq, counts = np.unique(rng.integers(-500, 500, 200) * 1_000_003, return_counts=True)
        ref.lookup(uniq.tolist(), counts.tolist())
    write_layout(tmp_path / "ck" / "dynamicemb" / "model", "user", ref.state())
    emb = DynamicEmbedding(4, name="user", capacity=300, eviction="lfu", admit_threshold=2)
    report = load_dynamic(str(tmp_path / "ck"), emb)
    assert report.loaded == {"model/user": len(ref.rows)}
    ref.touched.clear()
    ref.removed.clear()
    same(emb.table, ref)


def test_kernel_build_is_cached_and_failures_fall_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if _native._compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("RECKPT_KERNEL_CACHE", str(tmp_path / "cache"))
    first = _native.load().path
    assert first.startswith(str(tmp_path / "cache")) and _native.load().path == first
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [Path(first).name]  # no build debris
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("RECKPT_KERNEL_CACHE", str(tmp_path / "other"))
    with pytest.raises(RuntimeError, match="no C compiler"):
        _native.load()
    monkeypatch.setattr(index, "_KERNELS", [])
    monkeypatch.setenv("RECKPT_DYNAMIC_KERNELS", "1")
    with pytest.raises(RuntimeError, match="RECKPT_DYNAMIC_KERNELS=1"):
        index.kernels()
    monkeypatch.setattr(index, "_KERNELS", [])
    monkeypatch.setenv("RECKPT_DYNAMIC_KERNELS", "auto")
    assert index.kernels() is None  # warned, NumPy path


def test_a_fresh_process_builds_the_kernels_into_an_empty_cache(tmp_path: Path) -> None:
    if _native._compiler() is None:
        pytest.skip("no C compiler")
    code = "from reckpt.dynamic.index import kernels; k = kernels(); print(k is not None)"
    env = {"RECKPT_KERNEL_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin", "RECKPT_DYNAMIC_KERNELS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr[-2000:]
