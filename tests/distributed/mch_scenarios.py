"""Managed-collision (MCH / ZCH) state across world-size changes, on gloo.

One ``ManagedCollisionEmbeddingBagCollection`` (row-wise sharded table of ``ZCH`` slots, an
``MCHManagedCollisionModule`` with ``BUCKETS`` buckets). Saving and restoring at one world
size, and shrinking where every saved shard nests in one current shard, restore every admitted
id exactly; growing stops with :class:`~reckpt.sharding.mch.ManagedCollisionReshardError` naming the
module before any buffer is touched.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import reckpt
from tests.helpers import assert_state_dicts_equal
from tests.helpers.sharded import gather_all, momentum_states
from tests.helpers.torchrec_models import row_sharder

ZCH, DIM, BUCKETS, INPUT_SIZE = 32, 8, 4, 1000
MC = "mc_ebc._managed_collision_collection._managed_collision_modules.t"
MOMENTUM = "mc_ebc._embedding_module.embedding_bags.t.weight.t.momentum1"


def plain(seed: int) -> nn.Module:
    """The unsharded model: one table of ``ZCH`` rows behind an ``MCHManagedCollisionModule``."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
    from torchrec.modules.mc_modules import (
        DistanceLFU_EvictionPolicy,
        ManagedCollisionCollection,
        MCHManagedCollisionModule,
    )

    torch.manual_seed(seed)
    ebc = EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name="t", embedding_dim=DIM, num_embeddings=ZCH, feature_names=["f"])],
        device=torch.device("cpu"),
    )
    mch = MCHManagedCollisionModule(
        zch_size=ZCH,
        device=torch.device("cpu"),
        eviction_policy=DistanceLFU_EvictionPolicy(),
        eviction_interval=1,
        input_hash_size=INPUT_SIZE,
        buckets=BUCKETS,
    )
    mcc = ManagedCollisionCollection({"t": mch}, embedding_configs=ebc.embedding_bag_configs())

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mc_ebc = ManagedCollisionEmbeddingBagCollection(ebc, mcc, return_remapped_features=True)

        def forward(self, kjt: Any) -> Any:
            return self.mc_ebc(kjt)

    return Wrap()


def build(seed: int, adagrad: bool = True) -> Any:
    """The sharded model; ``adagrad``: fused row-wise Adagrad (else TorchRec's default SGD)."""
    from torchrec.distributed.mc_embeddingbag import ManagedCollisionEmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    model = plain(seed)
    if adagrad:
        apply_optimizer_in_backward(RowWiseAdagrad, model.parameters(), {"lr": 0.1})
    world = dist.get_world_size()
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world, compute_device="cpu"),
        constraints={"t": ParameterConstraints(sharding_types=["row_wise"], compute_kernels=["fused"])},
    )
    sharders: list[Any] = [ManagedCollisionEmbeddingBagCollectionSharder(ebc_sharder=row_sharder())]
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    return DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)


CROWDED = torch.arange(1, 21, dtype=torch.int64) * 5  # 20 ids, all in bucket 0 (raw < 250)


def ids() -> torch.Tensor:
    return torch.tensor([3, 17, 250, 251, 499, 500, 742, 999, 600, 42, 260, 777], dtype=torch.int64)


def lookup(dmp: Any, values: torch.Tensor, train: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Each id's embedding row and slot, every rank feeding the same one-id bags."""
    from torchrec import KeyedJaggedTensor

    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f"], values=values, lengths=torch.ones(len(values), dtype=torch.int64)
    )
    pooled, remapped = dmp(kjt)
    rows = pooled.values()
    if train:
        rows.sum().backward()
    return rows.detach().clone(), remapped["f"].values().clone()


def momentum(opt: Any) -> torch.Tensor:
    """The whole row-wise momentum of the table (gathered from the ranks holding shards)."""
    return gather_all(momentum_states(opt))[MOMENTUM]


def mc_state(dmp: Any) -> dict[str, torch.Tensor]:
    sd = dmp.state_dict()
    return gather_all({k: v for k, v in sd.items() if k.startswith(MC + ".")})


def save(rank: int, world: int, root: str, name: str, crowded: bool) -> None:
    """Admit ids and train once; save with a distinctive row-wise Adagrad state.

    Admitting ids in training mode evicts, which with a fused row-wise Adagrad calls an
    fbgemm operator that has no CPU kernel: the ids are admitted in an SGD model, whose
    checkpoint is restored into an Adagrad model whose momentum is then set row by row.
    """
    values = CROWDED if crowded else ids()
    sgd = build(seed=0, adagrad=False)
    lookup(sgd, values, train=True)
    reckpt.save_model(f"{root}/{name}-sgd/model.ckpt-1", sgd)
    dmp = build(seed=3)
    reckpt.restore_model(f"{root}/{name}-sgd/model.ckpt-1", dmp)
    for st in momentum_states(dmp.fused_optimizer).values():
        for shard in st.local_shards():
            off, n = shard.metadata.shard_offsets[0], shard.metadata.shard_sizes[0]
            shard.tensor.copy_(torch.arange(off, off + n, dtype=torch.float32) * 0.5 + 1)
    dmp.eval()
    rows, slots = lookup(dmp, values)
    mom = momentum(dmp.fused_optimizer)
    reckpt.save_model(f"{root}/{name}/model.ckpt-1", dmp, dmp.fused_optimizer)
    state = mc_state(dmp)
    if rank == 0:
        torch.save({"rows": rows, "momentum": mom[slots], "state": state}, f"{root}/{name}/expected.pt")
    dist.barrier()


def restore_exact(rank: int, world: int, root: str, src: str) -> None:
    """Every admitted id looks up the same row, with the same optimizer state, after the restore."""
    want = torch.load(f"{root}/{src}/expected.pt")
    dmp = build(seed=1)
    report = reckpt.restore_model(f"{root}/{src}/model.ckpt-1", dmp, dmp.fused_optimizer)
    mom = momentum(dmp.fused_optimizer)
    dmp.eval()
    rows, slots = lookup(dmp, ids())
    if rank == 0:
        assert torch.equal(rows, want["rows"]), (src, world)
        assert torch.equal(mom[slots], want["momentum"]), (src, world)
    saved_world = int(src[1])
    grew = world > saved_world
    assert grew == any("redistributed" in n for n in report.notes), report.notes


def restore_refuses_crowded(rank: int, world: int, root: str, src: str) -> None:
    from reckpt.sharding.mch import ManagedCollisionReshardError

    dmp = build(seed=1)
    before = mc_state(dmp)
    try:
        reckpt.restore_model(f"{root}/{src}/model.ckpt-1", dmp)
    except ManagedCollisionReshardError as e:
        assert MC in str(e) and "20 admitted ids for 16 slots" in str(e), str(e)
    else:
        raise AssertionError("20 ids of one bucket cannot fit one process's 16 slots")
    after = mc_state(dmp)
    assert_state_dicts_equal(before, after)  # no buffer was touched


def steps(rank: int, world: int, root: str, todo: list[tuple[Any, ...]]) -> None:
    """Several of the steps above in one process group (each spawn re-imports torchrec)."""
    for name, *args in todo:
        globals()[name](rank, world, root, *args)
        dist.barrier()


def check_unsharded(root: str, src: str) -> None:
    """In this (plain) process: ``load_unsharded`` into the unsharded model looks every id up exactly."""
    from torchrec import KeyedJaggedTensor

    want = torch.load(f"{root}/{src}/expected.pt")
    model = plain(seed=5)
    reckpt.sharding.load_unsharded(f"{root}/{src}/model.ckpt-1", model)
    model.eval()
    values = ids()
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f"], values=values, lengths=torch.ones(len(values), dtype=torch.int64)
    )
    pooled, _ = model(kjt)
    assert torch.equal(pooled.values(), want["rows"])
