"""The dynamicemb/ files as written in parallel from snapshots and read back into new key maps.

The files must be byte for byte the exported arrays (the documented layout) with the
manifest checksum of exactly those bytes, on a local disk (pieces written at offsets by a
pool of threads) and on other storage (one stream per file); a table that changes while it
is being written must still be dumped as it was when the save started; loads at another
world size, dumps with repeated keys and keys both counted and with a row keep the
semantics of ``DynamicTable.apply``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash

from reckpt.dynamic import DynamicEmbedding, dynamic_writer, files, hashindex, index, load_dynamic, snapshot
from reckpt.dynamic.index import KeyMap, kernels
from reckpt.dynamic.load import _Reader
from reckpt.dynamic.shards import read_shards
from reckpt.dynamic.table import DynamicTable
from reckpt.storage.core import storage_for

KINDS = {
    "emb_keys": ("keys", "<i8"),
    "emb_values": ("values", "<f4"),
    "emb_scores": ("scores", "<i8"),
    "emb_opt_values": ("opt_values", "<f4"),
    "counter_keys": ("counter_keys", "<i8"),
    "counter_frequencies": ("counter_freqs", "<i8"),
}


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of a few rows and sorted ranges from 64 keys: every step runs many times."""
    monkeypatch.setattr(files, "CHUNK_BYTES", 512)
    monkeypatch.setattr(snapshot, "_RANGES_FROM", 64)


def trained(admit: int = 2, steps: int = 12) -> DynamicEmbedding:
    emb = DynamicEmbedding(5, name="user", admit_threshold=admit, lr=0.1)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        ids = torch.randint(-3000, 3000, (400,), generator=g) * 7919
        emb(ids, torch.arange(0, 401, 20)).sum().backward()
    assert len(emb.table) > 500 and (admit < 2 or len(emb.table.counter) > 100)
    return emb


def expected_bytes(emb: DynamicEmbedding) -> dict[str, bytes]:
    st = emb.table.export()
    return {kind: np.asarray(getattr(st, f).numpy(), dtype=dt).tobytes() for kind, (f, dt) in KINDS.items()}


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_full_dump_is_the_exported_arrays_with_their_checksums(tmp_path: Path, where: str) -> None:
    emb = trained()
    want = expected_bytes(emb)
    root = str(tmp_path / "ck") if where == "local" else f"memory://dynfiles-{tmp_path.name}/ck"
    writer = dynamic_writer(emb)
    assert writer is not None
    storage = storage_for(root)
    records = writer(storage, root)
    for kind, data in want.items():
        rel = f"dynamicemb/model/user_{kind}.rank_0.world_size_1"
        assert storage.read_bytes(f"{root}/{rel}") == data, kind
        assert (records[rel].size, records[rel].checksum) == (len(data), xxhash.xxh3_64_hexdigest(data))
    with pytest.raises(RuntimeError, match="writes once"):
        writer(storage, root)


def test_a_change_during_the_write_leaves_the_dump_as_it_was_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    emb = trained()
    want = expected_bytes(emb)
    writer = dynamic_writer(emb)
    assert writer is not None
    copies = []
    materialize = snapshot.Part.materialize

    def counted(part: snapshot.Part) -> None:
        copies.append(part.n)
        materialize(part)

    monkeypatch.setattr(snapshot.Part, "materialize", counted)
    put = files._Out.put
    changed: list[bool] = []

    def put_then_train(out: files._Out, view: memoryview, done: files.Done | None = None) -> None:
        put(out, view, done)
        if out.rel.endswith("user_emb_values.rank_0.world_size_1") and not changed:
            changed.append(True)  # mid-write: new rows, trained rows, evictions
            emb(torch.arange(10**9, 10**9 + 300), torch.arange(0, 301, 3)).sum().backward()
            emb.table.evict(50)

    monkeypatch.setattr(files._Out, "put", put_then_train)
    writer(storage_for(str(tmp_path)), str(tmp_path))
    assert changed and copies  # the table was copied before it changed
    folder = tmp_path / "dynamicemb" / "model"
    for kind, data in want.items():
        assert (folder / f"user_{kind}.rank_0.world_size_1").read_bytes() == data, kind
    fresh = DynamicEmbedding(5, name="user", admit_threshold=2)
    load_dynamic(str(tmp_path), fresh)
    assert fresh.table.export().keys.tolist() == np.frombuffer(want["emb_keys"], "<i8").tolist()


def test_a_table_changed_after_its_dump_is_not_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    emb = trained(admit=0, steps=3)
    writer = dynamic_writer(emb)
    assert writer is not None
    writer(storage_for(str(tmp_path)), str(tmp_path))
    monkeypatch.setattr(snapshot.Part, "materialize", lambda part: pytest.fail("copied after the write"))
    emb(torch.arange(5), torch.tensor([0, 5])).sum().backward()


def test_each_rank_keeps_its_keys_of_every_shard(tmp_path: Path) -> None:
    emb = trained()
    writer = dynamic_writer(emb)
    assert writer is not None
    writer(storage_for(str(tmp_path)), str(tmp_path))
    folder = str(tmp_path / "dynamicemb" / "model")
    storage = storage_for(folder)
    reader = _Reader(storage, folder, "user", storage.ls(folder), 5)
    full = emb.table.export()
    for rank in (0, 1, 2):
        got = read_shards(storage, DynamicTable(5), reader.shards(True), rank, 3, True).state()
        mine = torch.remainder(full.keys, 3) == rank
        assert got.keys.tolist() == full.keys[mine].tolist()
        assert torch.equal(got.values, full.values[mine]) and torch.equal(got.scores, full.scores[mine])
        cmine = torch.remainder(full.counter_keys, 3) == rank
        assert got.counter_keys.tolist() == full.counter_keys[cmine].tolist()
        assert got.counter_freqs.tolist() == full.counter_freqs[cmine].tolist()


@pytest.mark.parametrize("path", ["numpy", "c"])
def test_repeated_keys_and_counted_rows_load_as_apply_has_them(
    tmp_path: Path, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if path == "numpy":
        monkeypatch.setattr(index, "_KERNELS", [None])
    elif kernels() is None:
        pytest.skip("no C kernels on this machine (no compiler)")
    folder = tmp_path / "dynamicemb" / "model"
    folder.mkdir(parents=True)
    arrays = {
        "emb_keys": np.array([5, 3, 5, 9], "<i8"),
        "emb_values": np.arange(8, dtype="<f4"),
        "emb_scores": np.array([1, 2, 3, 4], "<i8"),
        "counter_keys": np.array([9, 11], "<i8"),
        "counter_frequencies": np.array([4, 1], "<i8"),
    }
    for kind, arr in arrays.items():
        (folder / f"t_{kind}.rank_0.world_size_1").write_bytes(arr.tobytes())
    emb = DynamicEmbedding(2, name="t")
    load_dynamic(str(tmp_path), emb)
    got = emb.table.export()
    assert got.keys.tolist() == [3, 5] and got.values.tolist() == [[2.0, 3.0], [4.0, 5.0]]
    assert got.scores.tolist() == [2, 3] and emb.table.counter == {9: 4, 11: 1}


def test_in_place_doubling_keeps_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    k = kernels()
    if k is None:
        pytest.skip("no C kernels on this machine (no compiler)")
    for spill in (hashindex._SPILL, 0):  # 0: every doubling falls back to a rebuild from the keys
        monkeypatch.setattr(hashindex, "_SPILL", spill)
        rng = np.random.default_rng(spill)
        m = KeyMap({}, k)
        ref: dict[int, int] = {}
        for _ in range(12):
            new = np.unique(rng.integers(-(1 << 62), 1 << 62, 60_000))
            new = new[m.find(new) < 0]
            ref.update(zip(new.tolist(), m.add(new).tolist(), strict=True))
            gone = rng.choice(np.array(sorted(ref)), len(ref) // 4, replace=False)  # tombstones
            m.remove(m.find(gone))
            for key in gone.tolist():
                del ref[key]
        assert len(m.index.table) > hashindex._RESERVE_FROM and m.index.live == len(ref)
        keys = np.array(sorted(ref))
        assert m.find(keys).tolist() == [ref[x] for x in keys.tolist()]
        assert (m.find(keys + 1) == -1).sum() >= len(keys) - 1


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_touched_dump_is_fixed_when_taken_even_if_marks_clear_and_rows_change(
    tmp_path: Path, where: str
) -> None:
    emb = DynamicEmbedding(5, name="user", capacity=400, eviction="lfu", admit_threshold=2, lr=0.1)
    g = torch.Generator().manual_seed(4)

    def train(steps: int) -> None:
        for _ in range(steps):
            ids = torch.randint(-900, 900, (300,), generator=g) * 7919
            emb(ids, torch.arange(0, 301, 15)).sum().backward()

    train(8)
    emb.clear_touched()
    train(3)
    st = emb.table.export(emb.touched_keys())
    want = {kind: np.asarray(getattr(st, f).numpy(), dtype=dt).tobytes() for kind, (f, dt) in KINDS.items()}
    want["removed_keys"] = emb.removed_keys().numpy().astype("<i8").tobytes()
    assert len(st.keys) and len(want["removed_keys"])
    writer = dynamic_writer(emb, keys="touched")
    assert writer is not None
    emb.clear_touched()  # the checkpoint's baseline: marks go, the dump keeps its keys
    train(2)  # rows change before the hook runs: the snapshot copies first
    root = str(tmp_path / "ck") if where == "local" else f"memory://dyndelta-{tmp_path.name}/ck"
    storage = storage_for(root)
    records = writer(storage, root)
    for kind, data in want.items():
        rel = f"dynamicemb/model/user_{kind}.rank_0.world_size_1"
        assert storage.read_bytes(f"{root}/{rel}") == data, kind
        assert records[rel].checksum == xxhash.xxh3_64_hexdigest(data)
