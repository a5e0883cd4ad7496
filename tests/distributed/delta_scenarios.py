"""Delta checkpoints of TorchRec sharded tables (fused row-wise Adagrad) on gloo."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

import reckpt
from reckpt.delta.row_tracker import RowTracker
from reckpt.delta.save import save_delta
from tests.distributed.torchrec_scenarios import ROWS, build, weights
from tests.helpers import assert_state_dicts_equal
from tests.helpers.sharded import local_shards

SHARDING = {"t1": "column_wise", "t2": "table_wise"}


def _step(dmp: Any, seed: int) -> None:
    from torchrec import KeyedJaggedTensor

    g = torch.Generator().manual_seed(seed * 100 + dist.get_rank())
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f_t1", "f_t2"],
        values=torch.randint(0, ROWS // 4, (6,), generator=g),
        lengths=torch.tensor([1, 2, 0, 1, 1, 1]),
    )
    dmp(kjt).sum().backward()


def _local_state(dmp: Any, opt: Any) -> dict[str, list[torch.Tensor]]:
    """This rank's shards of every table's weights and optimizer state (no collectives)."""
    out = {k: local_shards(st) for k, st in dmp.state_dict().items()}
    for fqn, leaves in opt.state_dict()["state"].items():
        for name, value in leaves.items():
            out[f"{fqn}/{name}"] = local_shards(value)
    return out


def save_chain(rank: int, world: int, root: str) -> None:
    """Full at 1, deltas at 2 and 3 (only rows < ROWS/4 are ever touched); the state at 3 to a file."""
    dmp, opt = build(SHARDING, seed=0)
    tracker = RowTracker(dmp)
    assert sorted(tracker.tables) == ["ebc.embedding_bags.t1.weight", "ebc.embedding_bags.t2.weight"]
    _step(dmp, 1)
    base = reckpt.save_model(os.path.join(root, "model.ckpt-1"), dmp, opt)
    tracker.clear()
    _step(dmp, 2)
    rows = save_delta(os.path.join(root, "model.delta-2"), dmp, opt, tracker, base)
    assert 0 < rows["ebc.embedding_bags.t1.weight"] <= ROWS // 4, rows
    tracker.clear()
    _step(dmp, 3)
    save_delta(os.path.join(root, "model.delta-3"), dmp, opt, tracker, os.path.join(root, "model.delta-2"))
    reckpt.save_model(os.path.join(root, "ref", "model.ckpt-3"), dmp, opt)  # full, same step
    want = _local_state(dmp, opt)
    fresh, fopt = build(SHARDING, seed=5)  # same world size and plan: same shards
    reckpt.restore_model(os.path.join(root, "model.delta-3"), fresh, fopt)
    assert_state_dicts_equal(_local_state(fresh, fopt), want)


def restore_chain(rank: int, world: int, root: str) -> None:
    """Restore the chain at another world size: bitwise equal to the full checkpoint of step 3."""
    full, full_opt = build(SHARDING, seed=6)
    reckpt.restore_model(os.path.join(root, "ref", "model.ckpt-3"), full, full_opt)
    fresh, fopt = build(SHARDING, seed=7)
    report = reckpt.restore_model(os.path.join(root, "model.delta-3"), fresh, fopt)
    assert_state_dicts_equal(_local_state(fresh, fopt), _local_state(full, full_opt))
    assert not report.missing_keys
    assert not torch.equal(weights(fresh)["t1"], weights(build(SHARDING, seed=7)[0])["t1"])
