"""Dynamic tables through save_model / restore_model: the dynamicemb/ layout on every backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import reckpt
from reckpt.dynamic import DynamicEmbedding, dynamic_writer, load_dynamic
from reckpt.dynamic.table import TableState
from reckpt.errors import CheckpointNotFoundError, IntegrityError
from reckpt.storage.core import storage_for
from tests.helpers import state_dicts_equal
from tests.helpers.tensors import table_fields


class DynRec(nn.Module):
    """A dense tower over two dynamic tables (one with admission, one with LFU eviction)."""

    def __init__(self) -> None:
        super().__init__()
        self.user = DynamicEmbedding(4, name="user", admit_threshold=2, lr=0.1)
        self.item = DynamicEmbedding(4, name="item", capacity=40, eviction="lfu", lr=0.1)
        self.tower = nn.Linear(8, 1)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        n = len(users)
        offsets = torch.arange(n + 1)
        out: torch.Tensor = self.tower(
            torch.cat([self.user(users, offsets), self.item(items, offsets)], dim=1)
        )
        return out


def train(m: DynRec, steps: int, seed: int) -> torch.optim.Optimizer:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(steps):
        users = torch.randint(-50, 50, (16,), generator=g) * 1_000_003
        items = torch.randint(0, 60, (16,), generator=g)
        opt.zero_grad()
        m(users, items).pow(2).mean().backward()
        opt.step()
    return opt


def state(emb: DynamicEmbedding) -> dict[str, Any]:
    """A table's exported contents and its clock (compare with ``state_dicts_equal``)."""
    return {"clock": emb.table.clock, **table_fields(emb.table.export())}


def trained() -> DynRec:
    torch.manual_seed(0)
    m = DynRec()
    train(m, 6, seed=1)
    assert len(m.user.table) and m.user.table.counter and len(m.item.table) == 40
    return m


def sgd(m: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(m.parameters(), lr=0.1)


def test_save_restore_roundtrip_on_every_backend(root: str) -> None:
    m = trained()
    ck = f"{root}/model.ckpt-6"
    reckpt.save_model(ck, m, sgd(m))
    st = storage_for(ck)
    files = st.walk_files(ck)
    folder = "dynamicemb/model.user"
    for kind in (
        "emb_keys",
        "emb_values",
        "emb_scores",
        "emb_opt_values",
        "counter_keys",
        "counter_frequencies",
    ):
        assert f"{folder}/user_{kind}.rank_0.world_size_1" in files
    assert (
        f"{folder}/user_opt_args.json" in files
        and "dynamicemb/model.item/item_emb_keys.rank_0.world_size_1" in files
    )
    n = len(m.user.table)
    assert st.size(f"{ck}/{folder}/user_emb_values.rank_0.world_size_1") == n * 4 * 4
    raw = st.read_bytes(f"{ck}/{folder}/user_emb_keys.rank_0.world_size_1")
    assert torch.frombuffer(bytearray(raw), dtype=torch.int64).tolist() == sorted(m.user.table.slot_of)

    fresh = DynRec()
    train(fresh, 2, seed=7)
    assert not state_dicts_equal(state(fresh.user), state(m.user))
    report = reckpt.restore_model(ck, fresh, sgd(fresh))
    assert state_dicts_equal(state(fresh.user), state(m.user))
    assert state_dicts_equal(state(fresh.item), state(m.item))
    assert report.parts["dynamicemb"].loaded == ["model.item/item", "model.user/user"]
    assert reckpt.verify(ck).ok
    entries = {e.name: e for e in reckpt.restore.inspect_checkpoint(ck).parts["dynamicemb"]}
    assert entries["model.user/user"].shape == [n, 4] and entries["model.item/item"].shape == [40, 4]
    # Both continue identically.
    train(m, 3, seed=2)
    train(fresh, 3, seed=2)
    assert state_dicts_equal(state(fresh.user), state(m.user))
    assert state_dicts_equal(state(fresh.item), state(m.item))


def test_meta_selects_tables_and_optimizer_rows(tmp_path: Path) -> None:
    m = trained()
    ck = str(tmp_path / "model.ckpt-6")
    meta = {"dynamicemb_load_table_names": {"model.user": ["user"]}, "dynamicemb_load_optim": False}
    reckpt.save_model(ck, m, sgd(m), meta=meta)
    fresh = DynRec()
    train(fresh, 2, seed=7)
    item_before = state(fresh.item)
    report = reckpt.restore_model(ck, fresh, sgd(fresh))
    assert state_dicts_equal(state(fresh.item), item_before)
    got, want = fresh.user.table.export(), m.user.table.export()
    assert torch.equal(got.values, want.values) and torch.equal(got.keys, want.keys)
    assert torch.equal(got.opt_values, torch.zeros(len(got.keys))) and want.opt_values.abs().sum() > 0
    assert report.parts["dynamicemb"].loaded == ["model.user/user"]
    assert any("left out ['model.item/item']" in n for n in report.notes)


def test_touched_dump_upserts_onto_the_base(tmp_path: Path) -> None:
    m = trained()
    base = str(tmp_path / "model.ckpt-6")
    reckpt.save_model(base, m)
    m.user.clear_touched()
    m.item.clear_touched()
    train(m, 3, seed=5)
    assert m.item.removed_keys().numel() > 0  # capacity 40: the LFU table evicted
    delta = str(tmp_path / "model.delta-9")
    writer = dynamic_writer(m, keys="touched")
    assert writer is not None
    reckpt.save_model(delta, nn.Linear(1, 1), file_writers=[writer])
    n_rows = storage_for(delta).size(f"{delta}/dynamicemb/model.user/user_emb_keys.rank_0.world_size_1") // 8
    assert 0 < n_rows < len(m.user.table)

    fresh = DynRec()
    load_dynamic(base, fresh)
    load_dynamic(delta, fresh, upsert=True)
    assert state_dicts_equal(state(fresh.user), state(m.user))
    assert state_dicts_equal(state(fresh.item), state(m.item))


def _corrupt_then_restore(tmp_path: Path, edit: str) -> tuple[DynRec, tuple[TableState, int], Exception]:
    m = trained()
    ck = tmp_path / "model.ckpt-6"
    reckpt.save_model(str(ck), m)
    f = ck / "dynamicemb" / "model.user" / "user_emb_values.rank_0.world_size_1"
    if edit == "short":
        f.write_bytes(f.read_bytes()[:-4])
    else:
        f.unlink()
    fresh = DynRec()
    train(fresh, 2, seed=7)
    before = state(fresh.user)
    with pytest.raises((IntegrityError, CheckpointNotFoundError)) as exc:
        reckpt.restore_model(str(ck), fresh, verify=False)
    return fresh, before, exc.value


@pytest.mark.parametrize("edit", ["short", "missing"])
def test_a_bad_shard_is_a_clear_error_before_anything_changes(tmp_path: Path, edit: str) -> None:
    fresh, before, err = _corrupt_then_restore(tmp_path, edit)
    assert "user_emb_values.rank_0.world_size_1" in str(err)
    assert state_dicts_equal(state(fresh.user), before)
    assert isinstance(err, IntegrityError if edit == "short" else CheckpointNotFoundError)


def test_a_dump_of_another_dim_is_refused(tmp_path: Path) -> None:
    m = trained()
    ck = str(tmp_path / "model.ckpt-6")
    reckpt.save_model(ck, m)
    other = DynRec()
    other.user = DynamicEmbedding(8, name="user")
    with pytest.raises(IntegrityError, match=r"user_emb_values\.rank_0\.world_size_1: .* 8 float32"):
        load_dynamic(ck, other)


def test_optimizer_rows_load_only_with_an_optimizer(tmp_path: Path) -> None:
    """TorchEasyRec's default for meta.dynamicemb_load_optim: whether an optimizer is restored."""
    m = trained()
    ck = str(tmp_path / "model.ckpt-6")
    reckpt.save_model(ck, m, sgd(m))
    fresh = DynRec()
    reckpt.restore_model(ck, fresh)
    assert torch.equal(fresh.user.table.export().values, m.user.table.export().values)
    assert fresh.user.table.export().opt_values.abs().sum() == 0


def test_a_model_without_dynamic_tables_has_no_writer_and_no_folder(tmp_path: Path) -> None:
    assert dynamic_writer(nn.Linear(2, 2)) is None
    ck = tmp_path / "model.ckpt-1"
    reckpt.save_model(str(ck), nn.Linear(2, 2))
    assert not (ck / "dynamicemb").exists()


def test_async_manager_save_holds_the_tables_as_they_were(tmp_path: Path) -> None:
    """The manager copies the tables when the save starts; training on does not leak into it."""
    m = trained()
    want = (state(m.user), state(m.item))
    mgr = reckpt.CheckpointManager(str(tmp_path / "run"), async_save=True)
    path = mgr.save(6, m, sgd(m))
    train(m, 4, seed=9)  # while the save may still be writing
    mgr.close()
    assert not state_dicts_equal(state(m.user), want[0])
    fresh = DynRec()
    mgr2 = reckpt.CheckpointManager(str(tmp_path / "run"))
    info = mgr2.restore(path, fresh, sgd(fresh))
    mgr2.close()
    assert info.step == 6
    assert state_dicts_equal(state(fresh.user), want[0]) and state_dicts_equal(state(fresh.item), want[1])


def test_a_delta_chain_restores_the_dynamic_tables(tmp_path: Path) -> None:
    """base + 2 deltas (touched rows, evictions) restores the tables exactly (reckpt.delta.save)."""
    from reckpt.delta.save import save_delta

    run = tmp_path / "run"
    m = trained()
    tracker = reckpt.delta.RowTracker(m)
    reckpt.save_model(str(run / "model.ckpt-6"), m, sgd(m))
    tracker.clear()
    parent = run / "model.ckpt-6"
    for step, seed in ((9, 5), (12, 6)):
        train(m, 3, seed=seed)
        save_delta(str(run / f"model.delta-{step}"), m, sgd(m), tracker, parent=str(parent))
        tracker.clear()
        parent = run / f"model.delta-{step}"
    assert (
        run / "model.delta-12" / "dynamicemb" / "model.item" / "item_removed_keys.rank_0.world_size_1"
    ).exists()
    fresh = DynRec()
    reckpt.restore_model(str(parent), fresh, sgd(fresh))
    assert state_dicts_equal(state(fresh.user), state(m.user))
    assert state_dicts_equal(state(fresh.item), state(m.item))


def test_a_dump_in_torcheasyrec_layout_loads(tmp_path: Path) -> None:
    """Shards of 2 ranks as TorchEasyRec's tools write them: no scores, no optimizer rows, ``{}`` args."""
    folder = tmp_path / "ck" / "dynamicemb" / "model.user"
    folder.mkdir(parents=True)
    keys = {0: [4, 10, -2], 1: [7]}
    for rank, ks in keys.items():
        vals = torch.arange(len(ks) * 4, dtype=torch.float32) + 100 * rank
        (folder / f"user_emb_keys.rank_{rank}.world_size_2").write_bytes(torch.tensor(ks).numpy().tobytes())
        (folder / f"user_emb_values.rank_{rank}.world_size_2").write_bytes(vals.numpy().tobytes())
    (folder / "user_counter_keys.rank_0.world_size_2").write_bytes(b"")
    (folder / "user_counter_frequencies.rank_0.world_size_2").write_bytes(b"")
    (folder / "user_opt_args.json").write_text("{}")
    model = DynRec()
    report = load_dynamic(str(tmp_path / "ck"), model)
    got = model.user.table.export()
    assert got.keys.tolist() == [-2, 4, 7, 10] and report.source_world_size == {"model.user/user": 2}
    assert got.values[2].tolist() == [100.0, 101.0, 102.0, 103.0] and got.values[0].tolist() == [
        8.0,
        9.0,
        10.0,
        11.0,
    ]
    assert report.missing == ["model.item/item"]
    # Shards of two different world sizes side by side are refused.
    (folder / "user_emb_keys.rank_0.world_size_3").write_bytes(b"")
    with pytest.raises(IntegrityError, match=r"shard files of 2 world sizes \(\[2, 3\]\)"):
        load_dynamic(str(tmp_path / "ck"), DynRec())
