"""TorchRec scenarios: a DistributedModelParallel EmbeddingBagCollection with a fused optimizer."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

import reckpt
from reckpt.sharding.plan import read_plan
from tests.helpers import assert_state_dicts_equal
from tests.helpers.sharded import gather_all, local_momentum
from tests.helpers.torchrec_models import ebc_model, momentum_key, row_sharder, weight_key

ROWS, DIM = 40, 64
TABLES = ("t1", "t2")


def weights(dmp: Any) -> dict[str, torch.Tensor]:
    """Each table's whole weight, on every rank."""
    sd = dmp.state_dict()
    return gather_all({t: sd[weight_key(t)] for t in TABLES})


def build(sharding: dict[str, str], seed: int) -> tuple[Any, Any]:
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    torch.manual_seed(seed)
    model = ebc_model({t: (ROWS, DIM) for t in TABLES})
    apply_optimizer_in_backward(RowWiseAdagrad, model.ebc.parameters(), {"lr": 0.1})
    constraints = {
        t: ParameterConstraints(sharding_types=[st], min_partition=DIM // 2) for t, st in sharding.items()
    }
    world = dist.get_world_size()
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world, compute_device="cpu"), constraints=constraints
    )
    sharders: list[Any] = [EmbeddingBagCollectionSharder()]
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)
    return dmp, dmp.fused_optimizer


def train_step(dmp: Any) -> None:
    from torchrec import KeyedJaggedTensor

    g = torch.Generator().manual_seed(11)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f_t1", "f_t2"],
        values=torch.randint(0, ROWS, (12,), generator=g),
        lengths=torch.tensor([2, 1, 3, 2, 2, 2]),
    )
    dmp(kjt).sum().backward()


def plan_change_reinitialises_fused_state(rank: int, world: int, root: str) -> None:
    dmp, opt = build({"t1": "table_wise", "t2": "table_wise"}, seed=0)
    train_step(dmp)
    ckpt = f"{root}/model.ckpt-5"
    reckpt.save_model(ckpt, dmp, opt)
    plan = read_plan(ckpt)
    assert plan is not None and plan["ebc"]["t1"]["sharding_type"] == "table_wise"
    want = weights(dmp)
    mom_key = momentum_key("t1")
    want_mom = local_momentum(opt)

    # Same plan: weights and fused optimizer state exact.
    same, same_opt = build({"t1": "table_wise", "t2": "table_wise"}, seed=1)
    reckpt.restore_model(ckpt, same, same_opt)
    assert_state_dicts_equal(weights(same), want)
    assert_state_dicts_equal(local_momentum(same_opt), want_mom)
    has_t1 = [bool(want_mom.get("ebc.embedding_bags.t1.weight.t1.momentum1"))]
    dist.all_reduce(t := torch.tensor(has_t1, dtype=torch.int64))
    assert int(t) == 1, "table-wise: exactly one rank holds t1's momentum"

    # Changed plan (t1 column-wise): weights reshard exactly; t1's row-wise momentum no longer
    # fits (one value per row per column shard) and is re-initialised, reported, no crash.
    cw, cw_opt = build({"t1": "column_wise", "t2": "table_wise"}, seed=2)
    report = reckpt.restore_model(ckpt, cw, cw_opt)
    assert_state_dicts_equal(weights(cw), want)
    opt_report = report.part("optimizer")
    assert any(k.startswith(mom_key) for k in opt_report.reinitialized), opt_report
    assert any(m.key.startswith(mom_key) for m in opt_report.shape_mismatched)


def _planned(constraints: dict[str, Any]) -> dict[str, Any]:
    """The JSON plan the planner makes for the two-table model under ``constraints``."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology

    from reckpt.sharding.plan import plan_to_json

    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name=t, embedding_dim=DIM, num_embeddings=ROWS, feature_names=[f"f_{t}"])
            for t in ("t1", "t2", "t3")
        ],
        device=torch.device("meta"),
    )
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=dist.get_world_size(), compute_device="cpu"), constraints=constraints
    )
    return plan_to_json(planner.collective_plan(ebc, [row_sharder()], dist.GroupMember.WORLD))


def resumed_run_reproduces_plan(rank: int, world: int, root: str) -> None:
    """A checkpoint's plan, turned into planner constraints, gives the resumed run the same plan."""
    from torchrec.distributed.planner import ParameterConstraints

    from reckpt.sharding.plan import plan_constraints

    user = {
        "t1": ParameterConstraints(sharding_types=["row_wise"]),
        "t2": ParameterConstraints(sharding_types=["data_parallel"]),
        "t3": ParameterConstraints(sharding_types=["table_wise"]),
    }
    saved = _planned(user)
    if rank == 0:
        import json

        with open(f"{root}/plan", "w", encoding="utf-8") as f:
            json.dump(saved, f)
    dist.barrier()
    stored = read_plan(root)
    assert stored == saved
    fresh = _planned({})
    assert fresh != saved, "the test needs a plan the planner would not choose by itself"

    # TorchEasyRec's default: data-parallel tables keep their type, the rest is re-planned.
    default = _planned(plan_constraints(stored))
    assert default[""]["t2"]["sharding_type"] == "data_parallel"
    assert fresh[""]["t2"]["sharding_type"] != "data_parallel"
    # Pin all: the whole plan comes back.
    assert _planned(plan_constraints(stored, pin_all=True)) == saved
    # The user's own constraint for a table wins over the saved plan.
    mine = {"t3": ParameterConstraints(sharding_types=["data_parallel"])}
    again = _planned(plan_constraints(stored, mine, pin_all=True))
    assert again[""]["t3"]["sharding_type"] == "data_parallel"
    assert again[""]["t1"] == saved[""]["t1"]


def fork_snapshot_freezes_sharded_state(rank: int, world: int, root: str) -> None:
    """An async fork-snapshot save of a DMP model while the fused optimizer keeps updating rows."""
    dmp, opt = build({"t1": "column_wise", "t2": "table_wise"}, seed=0)
    train_step(dmp)
    want = weights(dmp)
    want_mom = local_momentum(opt)
    mgr = reckpt.CheckpointManager(root, async_save=True, async_snapshot="fork")
    path = mgr.save(1, dmp, opt)
    for _ in range(3):  # backward updates the rows in place while the child writes
        train_step(dmp)
    assert not torch.equal(weights(dmp)["t1"], want["t1"])
    mgr.wait()
    mgr.close()
    fresh, fresh_opt = build({"t1": "column_wise", "t2": "table_wise"}, seed=3)
    reckpt.restore_model(path, fresh, fresh_opt)
    assert_state_dicts_equal(weights(fresh), want)
    assert_state_dicts_equal(local_momentum(fresh_opt), want_mom)
    assert reckpt.verify(path).ok
