"""The DLRM-style model, its sharding (DistributedModelParallel on CPU) and optimizers."""

from __future__ import annotations

import atexit
import contextlib
import os
import tempfile
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from reckpt.trainer.config import Config

__all__ = ["init_distributed", "table_rows", "build_model", "shard_model", "table_name"]


def init_distributed() -> tuple[int, int]:
    """Join torchrun's process group (gloo), or make a one-process group; returns (rank, world)."""
    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group("gloo")
        else:
            fd, store = tempfile.mkstemp(prefix="reckpt-pg-")
            os.close(fd)
            atexit.register(_remove_quietly, store)
            dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def table_name(feature: str) -> str:
    return f"t_{feature}"


def table_rows(cfg: Config) -> dict[str, int]:
    return {c: cfg.model.table_sizes.get(c, cfg.model.num_embeddings) for c in cfg.data.sparse_columns}


def build_model(cfg: Config, device: str = "cpu") -> nn.Module:
    """A plain (unsharded) TorchRec DLRM: one embedding-bag table per sparse feature."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.models.dlrm import DLRM

    rows = table_rows(cfg)
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=table_name(c),
                embedding_dim=cfg.model.embedding_dim,
                num_embeddings=rows[c],
                feature_names=[c],
            )
            for c in cfg.data.sparse_columns
        ],
        device=torch.device(device),
    )
    model: nn.Module = DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=len(cfg.data.dense_columns),
        dense_arch_layer_sizes=list(cfg.model.bottom_mlp),
        over_arch_layer_sizes=list(cfg.model.top_mlp),
        dense_device=torch.device(device),
    )
    return model


def shard_model(
    cfg: Config, model: nn.Module, constraints: dict[str, Any] | None = None
) -> tuple[nn.Module, Any]:
    """Shard the tables with DistributedModelParallel (fused row-wise Adagrad) + Adam for the rest.

    Collective (the planner agrees on one plan). Returns ``(dmp, optimizer)``; the optimizer
    is a TorchRec ``CombinedOptimizer`` whose state is keyed by parameter name.
    ``constraints`` (``table -> ParameterConstraints``) go to the planner, e.g. those of
    :func:`reckpt.plan.plan_constraints` to keep a resumed run's plan.
    """
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    t = cfg.train_config
    ebc: Any = model.get_submodule("sparse_arch.embedding_bag_collection")
    apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": t.sparse_learning_rate})
    sharders: list[Any] = [EmbeddingBagCollectionSharder()]
    world = dist.get_world_size()
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world, compute_device="cpu"), constraints=constraints
    )
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.Adam(params, lr=t.learning_rate),
    )
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense])
