"""Resized tables under TorchRec sharding, and a resized DTensor: the overlapping block loads.

A sharded EmbeddingBagCollection saves four 12 x 8 tables; the restoring model has three of
them grown to 16 rows (table-wise, row-wise, column-wise) and one grown to 12 columns
(table-wise), with the same fused optimizer. Expected values are the fresh model's values with
the saved tensors' overlapping block written in by hand: row-wise state of the column-wise
table per column shard (its flat layout is ``[shard 0 rows, shard 1 rows]``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import reckpt
from reckpt.errors import ShapeMismatchError
from reckpt.sharding.fused_state import flat_state
from tests.helpers import state_dicts_equal
from tests.helpers.sharded import all_gather_objects
from tests.helpers.torchrec_models import ebc_model, momentum_key, row_sharder, snapshot, weight_key

SAVED = {"tw": (12, 8), "rw": (12, 8), "cw": (12, 8), "col": (12, 8)}
GROWN = {"tw": (16, 8), "rw": (16, 8), "cw": (16, 8), "col": (12, 12)}
PLAN = {"tw": "table_wise", "rw": "row_wise", "cw": "column_wise", "col": "table_wise"}


def build(tables: dict[str, tuple[int, int]], seed: int, optim: str) -> tuple[Any, Any]:
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    torch.manual_seed(seed)
    model = ebc_model(tables)
    opt_class: Any = RowWiseAdagrad if optim == "rowwise" else torch.optim.Adagrad
    apply_optimizer_in_backward(opt_class, model.ebc.parameters(), {"lr": 0.1})
    constraints = {t: ParameterConstraints(sharding_types=[st], min_partition=4) for t, st in PLAN.items()}
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=dist.get_world_size(), compute_device="cpu"), constraints=constraints
    )
    sharders = [row_sharder()]
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)
    types = {t: plan.plan["ebc"][t].sharding_type for t in tables}  # type: ignore[index, union-attr]
    assert types == PLAN, types
    return dmp, dmp.fused_optimizer


def train(dmp: Any) -> None:
    from torchrec import KeyedJaggedTensor

    g = torch.Generator().manual_seed(3 + dist.get_rank())
    for _ in range(2):
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=[f"f_{t}" for t in SAVED],
            values=torch.randint(0, 12, (4 * len(SAVED),), generator=g),
            lengths=torch.full((2 * len(SAVED),), 2),
        )
        dmp(kjt).sum().backward()


def corner(saved: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """TorchEasyRec's result: ``fresh`` with the block both shapes share taken from ``saved``."""
    want = fresh.clone()
    block = tuple(slice(0, min(a, b)) for a, b in zip(saved.shape, fresh.shape, strict=True))
    want[block] = saved[block]
    return want


def expected_state(t: str, saved: torch.Tensor, fresh: torch.Tensor, optim: str) -> torch.Tensor:
    if optim == "rowwise" and PLAN[t] == "column_wise":
        # k column shards, each its own row-wise state: the overlap is taken shard by shard.
        want, k = fresh.clone(), 2
        old, new = SAVED[t][0], GROWN[t][0]
        for i in range(k):
            want[i * new : i * new + old] = saved[i * old : (i + 1) * old]
        return want
    return corner(saved, fresh)


def grown_tables(rank: int, world: int, root: str) -> None:
    for optim in ("rowwise", "adagrad"):
        dmp, opt = build(SAVED, seed=1, optim=optim)
        train(dmp)
        ckpt = f"{root}/{optim}/model.ckpt-2"
        reckpt.save_model(ckpt, dmp, opt)
        saved = snapshot(dmp, opt, SAVED)

        new, new_opt = build(GROWN, seed=2, optim=optim)
        fresh = snapshot(new, new_opt, SAVED)
        report = reckpt.restore_model(ckpt, new, new_opt)
        got = snapshot(new, new_opt, SAVED)
        for t in SAVED:
            w = weight_key(t)
            assert torch.equal(got[w], corner(saved[w], fresh[w])), f"{optim} {t} weight"
            s = momentum_key(t)
            want = expected_state(t, saved[s], fresh[s], optim)
            assert torch.equal(got[s], want), f"{optim} {t} {PLAN[t]} state"

        # Reports are per rank, over the keys this rank holds a shard of (DCP drops a rank's
        # empty ShardedTensors); together they name every resized key.
        model = report.part("model")
        weights = {weight_key(t) for t in SAVED}
        mine = {k for k, v in new.state_dict().items() if k in weights and v.local_shards()}
        assert model.resized == sorted(mine), model
        blocks = {m.key: (m.saved, m.current, m.block) for m in model.shape_mismatched}
        for t in SAVED:
            if weight_key(t) in blocks:
                assert blocks[weight_key(t)] == (SAVED[t], GROWN[t], (12, 8)), blocks
        held = {k for k, _, _, _ in flat_state(new_opt.state_dict())}
        part = report.part("optimizer")
        assert not part.reinitialized, part.reinitialized
        grew = {momentum_key(t) for t in SAVED if optim == "adagrad" or t != "col"}  # [12] rowwise: same
        assert set(part.resized) == grew & held, (optim, part.resized, held)
        everyone = all_gather_objects((model.resized, part.resized))
        assert {k for m, _ in everyone for k in m} == weights
        assert {k for _, o in everyone for k in o} == grew
        if optim == "rowwise":
            strict_mode(ckpt, saved)
        dist.barrier()


def strict_mode(ckpt: str, saved: dict[str, torch.Tensor]) -> None:
    """``strict_shapes``: refused on every rank before loading; with ``allow_row_resize`` the
    grown rows load but the row-wise state of resized tables starts afresh (as before)."""
    new, new_opt = build(GROWN, seed=2, optim="rowwise")
    fresh = snapshot(new, new_opt, SAVED)
    try:
        reckpt.restore_model(ckpt, new, new_opt, strict_shapes=True)
        raise AssertionError("strict_shapes=True accepted resized tables")
    except ShapeMismatchError as e:
        # Every rank raises the lowest failing rank's error (naming the keys that rank holds).
        assert any(weight_key(t) in str(e) for t in SAVED) and "strict_shapes=True refuses" in str(e), e
    assert state_dicts_equal(fresh, snapshot(new, new_opt, SAVED))
    keep = {weight_key("col"): "-", momentum_key("col"): "-"}  # grew in columns: not a row resize
    report = reckpt.restore_model(
        ckpt, new, new_opt, strict_shapes=True, allow_row_resize=True, param_map=keep
    )
    got = snapshot(new, new_opt, SAVED)
    for t in ("tw", "rw", "cw"):
        assert torch.equal(got[weight_key(t)], corner(saved[weight_key(t)], fresh[weight_key(t)])), t
        assert torch.equal(got[momentum_key(t)], fresh[momentum_key(t)]), t
    assert torch.equal(got[weight_key("col")], fresh[weight_key("col")])
    held = {k for k, _, _, _ in flat_state(new_opt.state_dict())}
    reinit = {momentum_key(t) for t in ("tw", "rw", "cw")} & held
    assert reinit <= set(report.part("optimizer").reinitialized), report.part("optimizer")
    assert not report.part("optimizer").resized


def _dtensor_holder(shape: tuple[int, int], placement: Any, seed: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    full = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    holder = nn.Module()
    holder.w = nn.Parameter(distribute_tensor(full, mesh, [placement]))
    return holder


def grown_dtensor(rank: int, world: int, root: str) -> None:
    from torch.distributed.tensor import Shard

    old = _dtensor_holder((6, 4), Shard(0), seed=1)
    ckpt = reckpt.save_model(f"{root}/dtensor/model.ckpt-1", old)
    saved = old.w.full_tensor()
    for shape, placement in (((9, 5), Shard(1)), ((4, 3), Shard(0))):
        new = _dtensor_holder(shape, placement, seed=2)
        fresh = new.w.full_tensor()
        report = reckpt.restore_model(ckpt, new)
        assert torch.equal(new.w.full_tensor(), corner(saved, fresh)), shape
        (m,) = report.part("model").shape_mismatched
        assert (m.saved, m.current, m.block) == ((6, 4), shape, (min(6, shape[0]), min(4, shape[1])))
