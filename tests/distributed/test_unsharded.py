"""Unsharded load: a 2-process TorchRec checkpoint into a plain model, exact and memory-bounded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from benchmarks import unsharded_load
from torch import nn

import reckpt
from reckpt.dcp.reader import read_dcp_metadata
from reckpt.errors import ConfigError, ShapeMismatchError
from reckpt.sharding.unsharded import read_rows
from reckpt.storage.core import storage_for
from tests.helpers import assert_state_dicts_equal


def test_unsharded_load_is_exact_and_streams_one_table_at_a_time(tmp_path: Path) -> None:
    """Extra RSS (fresh subprocess) stays within largest table + dense part + 64 MB.

    It also stays below one table: DCP's own load of the same checkpoint holds a whole
    table's chunk (and a copy) at once, which this size is chosen to show.
    """
    doc = unsharded_load.main(
        [
            *("--tables", "4", "--table-mb", "64", "--dense-mb", "4"),
            *("--methods", "load_unsharded,dcp_load", "--out", str(tmp_path)),
        ]
    )
    ours, dcp = doc["results"]["load_unsharded"], doc["results"]["dcp_load"]
    assert ours["exact"] and dcp["exact"]
    assert ours["extra_rss_mb"] <= doc["figures"]["bound_mb"]
    assert ours["extra_rss_mb"] < ours["largest_table_mb"] < dcp["extra_rss_mb"]
    saved = json.loads((tmp_path / "unsharded_load.json").read_text())
    assert saved["figures"] == doc["figures"]
    assert (tmp_path / "unsharded_load.md").read_text().startswith("# unsharded_load")
    assert (tmp_path / "unsharded_load.png").read_bytes()[:4] == b"\x89PNG"


class _Net(nn.Module):
    def __init__(self, rows: int = 6) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(rows, 5))
        self.lin = nn.Linear(5, 3)
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))


def test_plain_checkpoint_roundtrip_meta_module_and_errors(tmp_path: Path) -> None:
    src = _Net()
    src.count += 7
    reckpt.save_model(str(tmp_path / "model.ckpt-1"), src)
    dst = _Net()
    report = reckpt.sharding.load_unsharded(str(tmp_path / "model.ckpt-1"), dst)
    assert_state_dicts_equal(dst.state_dict(), src.state_dict())
    assert report.verified and sorted(report.part("model").loaded) == sorted(src.state_dict())
    rows = torch.tensor([5, 0, 3, 5])
    md = read_dcp_metadata(storage_for(str(tmp_path)), str(tmp_path / "model.ckpt-1" / "model"))
    picked = read_rows(
        storage_for(str(tmp_path)), str(tmp_path / "model.ckpt-1" / "model"), md, "table", rows
    )
    assert picked is not None and torch.equal(picked, src.table.detach()[rows])

    with pytest.raises(ShapeMismatchError, match="table: checkpoint \\[6, 5\\], module \\[4, 5\\]"):
        reckpt.sharding.load_unsharded(str(tmp_path / "model.ckpt-1"), _Net(rows=4))
    with torch.device("meta"):
        meta = _Net()
    with pytest.raises(ConfigError, match="init_parameters"):
        reckpt.sharding.load_unsharded(str(tmp_path / "model.ckpt-1"), meta)
    replaced = reckpt.sharding.init_parameters(meta, "cpu")
    assert set(replaced) == {"table", "lin.weight", "lin.bias", "count"}
    reckpt.sharding.load_unsharded(str(tmp_path / "model.ckpt-1"), meta)
    assert torch.equal(meta.table, src.table) and int(meta.count) == 7
