"""The resharding matrix: TorchRec models saved at world sizes 1-3 under two plans, loaded at 1-3.

Nine tiny tables, each under a different (plan A, plan B) pair of sharding types, so that one
model covers every required change: data_parallel <-> table_wise / row_wise / column_wise,
table_wise <-> row_wise, column_wise -> row_wise / table_wise, and the changes whose row-wise
Adagrad state cannot be converted (table_wise / row_wise -> column_wise). One process group per
world size saves both plans and loads every checkpoint written so far under both plans.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

import reckpt
from reckpt.sharding.fused_state import flat_state
from reckpt.sharding.plan import plan_to_json, read_plan
from tests.helpers.sharded import all_gather_objects
from tests.helpers.torchrec_models import ebc_model, momentum_key, row_sharder, snapshot, weight_key

ROWS, DIM = 12, 8
PLANS: dict[str, dict[str, str]] = {
    "A": {
        "t0": "data_parallel",
        "t1": "data_parallel",
        "t2": "data_parallel",
        "t3": "table_wise",
        "t4": "row_wise",
        "t5": "column_wise",
        "t6": "column_wise",
        "t7": "table_wise",
        "t8": "column_wise",
    },
    "B": {
        "t0": "table_wise",
        "t1": "row_wise",
        "t2": "column_wise",
        "t3": "data_parallel",
        "t4": "data_parallel",
        "t5": "data_parallel",
        "t6": "row_wise",
        "t7": "row_wise",
        "t8": "table_wise",
    },
}
TABLES = sorted(PLANS["A"])


OPTIMIZERS = ("rowwise", "adagrad")
"""Row-wise Adagrad (one state value per row) and Adagrad (one per element)."""


def build(plan: dict[str, str], seed: int, optim: str = "rowwise") -> tuple[Any, Any]:
    """A sharded EmbeddingBagCollection: the fused optimizer for sharded tables, the same
    optimizer as a dense one (TorchRec's ``RowWiseAdagrad`` / ``torch.optim.Adagrad``) for
    data-parallel tables."""
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    torch.manual_seed(seed)
    model = ebc_model({t: (ROWS, DIM) for t in TABLES})
    opt_class: Any = RowWiseAdagrad if optim == "rowwise" else torch.optim.Adagrad
    apply_optimizer_in_backward(opt_class, model.ebc.parameters(), {"lr": 0.1})
    constraints = {
        t: ParameterConstraints(sharding_types=[st], min_partition=DIM // 2) for t, st in plan.items()
    }
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=dist.get_world_size(), compute_device="cpu"), constraints=constraints
    )
    sharders = [row_sharder()]
    sharding_plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=sharding_plan, sharders=sharders)
    optims: list[Any] = [dmp.fused_optimizer]
    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    if dense:
        optims.append(KeyedOptimizerWrapper(dense, lambda ps: opt_class(ps, lr=0.1)))
    return dmp, CombinedOptimizer(optims)


def train(dmp: Any, opt: Any, steps: int = 2) -> None:
    from torchrec import KeyedJaggedTensor

    g = torch.Generator().manual_seed(5 + dist.get_rank())
    for _ in range(steps):
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=[f"f_{t}" for t in TABLES],
            values=torch.randint(0, ROWS, (4 * len(TABLES),), generator=g),
            lengths=torch.full((2 * len(TABLES),), 2),
        )
        dmp(kjt).sum().backward()
        opt.step()
        opt.zero_grad()


def momentum(snap: dict[str, torch.Tensor], t: str, sharding: str) -> torch.Tensor:
    """A table's Adagrad state, flat (row-wise: ``[rows * column shards]``)."""
    if sharding == "data_parallel":
        return snap[f"state.{weight_key(t)}.sum"].reshape(-1)
    return snap[momentum_key(t)].reshape(-1)


def expected_momentum(saved: torch.Tensor, old: str, new: str, optim: str) -> torch.Tensor | None:
    """What the conversion table promises (``None``: re-initialised)."""
    if optim == "adagrad":
        return saved  # one value per element: only renamed and resharded
    old_cw, new_cw = old == "column_wise", new == "column_wise"
    if old_cw == new_cw:
        return saved
    if old_cw:
        # Two column shards of width DIM/2: the row's value is the width-weighted mean.
        return saved[:ROWS] * 0.5 + saved[ROWS:] * 0.5
    return None


def save_world(root: str, world: int) -> None:
    for optim in OPTIMIZERS:
        for name, plan in PLANS.items():
            dmp, opt = build(plan, seed=world * 10 + ord(name), optim=optim)
            train(dmp, opt)
            ckpt = f"{root}/{optim}-w{world}{name}/model.ckpt-1"
            reckpt.save_model(ckpt, dmp, opt)
            saved_plan = read_plan(ckpt)
            assert saved_plan is not None and saved_plan == plan_to_json(dmp.plan)
            assert {t: e["sharding_type"] for t, e in saved_plan["ebc"].items()} == plan
            snap = snapshot(dmp, opt, TABLES)
            if dist.get_rank() == 0:
                torch.save(snap, f"{root}/{optim}-w{world}{name}/expected.pt")
            dist.barrier()


def load_world(root: str, world: int) -> None:
    """Load every checkpoint under ``root`` under both plans; exact where the table says so."""
    saved = sorted(d for d in os.listdir(root) if os.path.isfile(f"{root}/{d}/expected.pt"))
    for src in saved:
        want = torch.load(f"{root}/{src}/expected.pt")
        old_plan = PLANS[src[-1]]
        optim = src.split("-")[0]
        for name, plan in PLANS.items():
            dmp, opt = build(plan, seed=99, optim=optim)
            fresh = snapshot(dmp, opt, TABLES)
            report = reckpt.restore_model(f"{root}/{src}/model.ckpt-1", dmp, opt)
            got = snapshot(dmp, opt, TABLES)
            where = f"{src} -> w{world}{name}"
            opt_report = report.part("optimizer")
            for t in TABLES:
                assert torch.equal(got[weight_key(t)], want[weight_key(t)]), f"{where}: {t} weight"
                expect = expected_momentum(momentum(want, t, old_plan[t]), old_plan[t], plan[t], optim)
                value = momentum(got, t, plan[t])
                key = f"state.{weight_key(t)}.sum" if plan[t] == "data_parallel" else momentum_key(t)
                holds = key in {k for k, _, _, _ in flat_state(opt.state_dict())}
                if expect is None:
                    assert torch.equal(value, momentum(fresh, t, plan[t])), f"{where}: {t} re-initialised"
                    # Reports are per rank: a rank holding no shard of the table has no such key.
                    reported = key in opt_report.reinitialized
                    assert reported == holds, (where, t, opt_report.reinitialized)
                    assert reported == any(key in n and "re-initialised" in n for n in report.notes)
                    assert any(all_gather_objects(reported)), (where, t)
                else:
                    assert torch.equal(value, expect), f"{where}: {t} {old_plan[t]} -> {plan[t]} momentum"
                    assert key not in opt_report.reinitialized, (where, t)
                if old_plan[t] == plan[t] == "data_parallel":
                    step = f"state.{weight_key(t)}.step"
                    assert torch.equal(got[step], want[step]), f"{where}: {t} step"


def save_and_load(rank: int, world: int, root: str, save: bool, load: bool) -> None:
    if save:
        save_world(root, world)
    if load:
        load_world(root, world)
