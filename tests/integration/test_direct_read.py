"""The restore read path: tensor items go straight into their destination, the rest through DCP."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

import reckpt
from reckpt.dcp.planner import PartialLoadPlanner
from reckpt.dcp.reader import SafeReader
from reckpt.dcp.writer import dcp_call
from reckpt.storage.core import storage_for
from tests.helpers import TinyRec, fresh, state_dicts_equal, trained


def _load(ck: str, sd: dict[str, torch.Tensor], **planner_kw: object) -> SafeReader:
    reader = SafeReader(f"{ck}/model", storage_for(ck))
    planner = PartialLoadPlanner(**planner_kw)  # type: ignore[arg-type]
    dcp_call(dcp_load, "test load", sd, storage_reader=reader, planner=planner, no_dist=True)
    return reader


def test_whole_tensors_are_read_in_place_and_equal(tmp_path: Path) -> None:
    m, o = trained(extra=True)
    ck = reckpt.save_model(str(tmp_path / "model.ckpt-1"), m, o)
    dest, _ = fresh(extra=True)
    sd = dest.state_dict()
    ptrs = {k: v.data_ptr() for k, v in sd.items()}
    reader = _load(ck, sd)
    assert reader.direct_items == len(sd) and reader.dcp_items == 0
    assert {k: v.data_ptr() for k, v in dest.state_dict().items()} == ptrs  # filled in place
    assert state_dicts_equal(dest.state_dict(), m.state_dict())


def test_a_slice_of_a_saved_tensor_takes_dcp_path(tmp_path: Path) -> None:
    torch.manual_seed(0)
    big = TinyRec(rows=60)
    ck = reckpt.save_model(str(tmp_path / "model.ckpt-1"), big)
    small = TinyRec(rows=40)
    sd = small.state_dict()
    reader = _load(ck, sd, allow_row_resize=True)
    assert reader.dcp_items >= 1 and reader.direct_items == len(sd) - 1
    assert torch.equal(small.state_dict()["emb.user.weight"], big.state_dict()["emb.user.weight"][:40])


def test_a_grown_table_reads_its_saved_rows_in_place(tmp_path: Path) -> None:
    torch.manual_seed(0)
    small = TinyRec(rows=40)
    ck = reckpt.save_model(str(tmp_path / "model.ckpt-1"), small)
    big = TinyRec(rows=60)
    init = big.state_dict()["emb.user.weight"].clone()
    sd = big.state_dict()
    reader = _load(ck, sd)  # overlap is the default: the saved rows are the destination's first
    assert reader.direct_items == len(sd) and reader.dcp_items == 0
    got = big.state_dict()["emb.user.weight"]
    assert torch.equal(got[:40], small.state_dict()["emb.user.weight"]) and torch.equal(got[40:], init[40:])


def test_restore_on_every_backend_uses_the_direct_path(root: str) -> None:
    m, o = trained()
    ck = reckpt.save_model(f"{root}/model.ckpt-1", m, o)
    dest, opt = fresh()
    reckpt.restore_model(ck, dest, opt)
    assert state_dicts_equal(dest.state_dict(), m.state_dict())


def test_a_view_of_a_larger_tensor_is_saved_without_its_neighbours(tmp_path: Path) -> None:
    from reckpt.dcp.writer import exact_storage_view
    from reckpt.save.engine import save_parts

    flat = torch.randn(100_000)  # like TorchRec's flat TBE weights holding several tables
    table = flat[1000:1640].view(10, 64)
    alias = exact_storage_view(table)
    assert alias.data_ptr() == table.data_ptr() and alias.untyped_storage().nbytes() == table.nbytes
    ck = save_parts(str(tmp_path / "model.ckpt-1"), [("model", {"t": table})])
    data = sum(f.stat().st_size for f in (tmp_path / "model.ckpt-1" / "model").glob("*.distcp"))
    assert data < 4 * table.nbytes < flat.nbytes  # not the whole flat buffer
    got = {"t": torch.zeros(10, 64)}
    _load(ck, got)
    assert torch.equal(got["t"], table)
    strided = table.t()
    assert exact_storage_view(strided) is strided  # not contiguous: left to DCP (which clones it)
