"""Delta checkpoints of TorchRec sharded tables (fused row-wise Adagrad) on gloo."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

import reckpt
from reckpt.delta.row_tracker import RowTracker
from reckpt.delta.save import save_delta
from tests.distributed.torchrec_scenarios import DIM, ROWS, build, gathered

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
    out = {k: [s.tensor.clone() for s in st.local_shards()] for k, st in dmp.state_dict().items()}
    for fqn, leaves in opt.state_dict()["state"].items():
        for name, value in leaves.items():
            out[f"{fqn}/{name}"] = [s.tensor.clone() for s in value.local_shards()]
    return out


def _equal(a: dict[str, list[torch.Tensor]], b: dict[str, list[torch.Tensor]]) -> None:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    for k in a:
        assert len(a[k]) == len(b[k]) and all(torch.equal(x, y) for x, y in zip(a[k], b[k], strict=True)), k


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
    _equal(_local_state(fresh, fopt), want)


def restore_chain(rank: int, world: int, root: str) -> None:
    """Restore the chain at another world size: bitwise equal to the full checkpoint of step 3."""
    full, full_opt = build(SHARDING, seed=6)
    reckpt.restore_model(os.path.join(root, "ref", "model.ckpt-3"), full, full_opt)
    fresh, fopt = build(SHARDING, seed=7)
    report = reckpt.restore_model(os.path.join(root, "model.delta-3"), fresh, fopt)
    _equal(_local_state(fresh, fopt), _local_state(full, full_opt))
    assert not report.missing_keys
    w = gathered(fresh.state_dict()["ebc.embedding_bags.t1.weight"], (ROWS, DIM))
    assert not torch.equal(
        w, gathered(build(SHARDING, seed=7)[0].state_dict()["ebc.embedding_bags.t1.weight"], (ROWS, DIM))
    )
