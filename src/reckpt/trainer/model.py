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

__all__ = ["init_distributed", "table_rows", "build_model", "shard_model", "table_name", "DynamicDLRM"]


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


DYNAMIC_ROWS = 1 << 62
"""``table_rows`` of a dynamic feature: ids are its keys, not reduced to a table size."""


def table_rows(cfg: Config) -> dict[str, int]:
    return {
        c: DYNAMIC_ROWS
        if c in cfg.model.dynamic_tables
        else cfg.model.table_sizes.get(c, cfg.model.num_embeddings)
        for c in cfg.data.sparse_columns
    }


def build_model(cfg: Config, device: str = "cpu") -> nn.Module:
    """A plain (unsharded) TorchRec DLRM: one embedding-bag table per sparse feature.

    Features listed in ``model.dynamic_tables`` get a :class:`~reckpt.dynamic.DynamicEmbedding`
    instead (a :class:`DynamicDLRM`).
    """
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.models.dlrm import DLRM

    rows = table_rows(cfg)
    static = [c for c in cfg.data.sparse_columns if c not in cfg.model.dynamic_tables]
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=table_name(c),
                embedding_dim=cfg.model.embedding_dim,
                num_embeddings=rows[c],
                feature_names=[c],
            )
            for c in static
        ],
        device=torch.device(device),
    )
    kwargs: dict[str, Any] = {
        "embedding_bag_collection": ebc,
        "dense_in_features": len(cfg.data.dense_columns),
        "dense_arch_layer_sizes": list(cfg.model.bottom_mlp),
        "over_arch_layer_sizes": list(cfg.model.top_mlp),
        "dense_device": torch.device(device),
    }
    if cfg.model.dynamic_tables:
        return DynamicDLRM(cfg, **kwargs)
    model: nn.Module = DLRM(**kwargs)
    return model


class DynamicDLRM(nn.Module):
    """TorchRec's DLRM whose interaction also takes pooled rows of dynamic tables.

    The TorchRec parts keep DLRM's names (``sparse_arch``, ``dense_arch``, ``inter_arch``,
    ``over_arch``); the dynamic tables (``dynamic.<feature>``) have no parameters, so
    DistributedModelParallel neither shards nor broadcasts them, and they are saved in the
    checkpoint's ``dynamicemb/`` folder.
    """

    def __init__(self, cfg: Config, **dlrm_kwargs: Any) -> None:
        super().__init__()
        from torchrec.models.dlrm import DLRM, InteractionArch, OverArch

        from reckpt.dynamic.module import DynamicEmbedding

        base = DLRM(**dlrm_kwargs)
        self.static_features: list[str] = list(base.sparse_arch.sparse_feature_names)
        n = len(self.static_features) + len(cfg.model.dynamic_tables)
        dim = cfg.model.embedding_dim
        self.sparse_arch, self.dense_arch = base.sparse_arch, base.dense_arch
        self.inter_arch = InteractionArch(num_sparse_features=n)
        self.over_arch = OverArch(
            in_features=dim + n * (n - 1) // 2 + n,
            layer_sizes=list(cfg.model.top_mlp),
            device=dlrm_kwargs["dense_device"],
        )
        lr = cfg.train_config.sparse_learning_rate
        self.dynamic = nn.ModuleDict(
            {
                f: DynamicEmbedding(
                    dim,
                    name=table_name(f),
                    capacity=t.capacity or None,
                    eviction=t.eviction,
                    admit_threshold=t.admit_threshold,
                    lr=t.learning_rate or lr,
                    seed=cfg.train_config.seed,
                )
                for f, t in cfg.model.dynamic_tables.items()
            }
        )

    def forward(self, dense_features: torch.Tensor, sparse_features: Any) -> torch.Tensor:
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        jts = sparse_features.to_dict()
        static = KeyedJaggedTensor.from_jt_dict({f: jts[f] for f in self.static_features})
        pooled = [self.sparse_arch(static), *(emb(jts[f]).unsqueeze(1) for f, emb in self.dynamic.items())]
        inter = self.inter_arch(
            dense_features=self.dense_arch(dense_features), sparse_features=torch.cat(pooled, 1)
        )
        out: torch.Tensor = self.over_arch(inter)
        return out


def shard_model(
    cfg: Config, model: nn.Module, constraints: dict[str, Any] | None = None
) -> tuple[nn.Module, Any]:
    """Shard the tables with DistributedModelParallel (fused row-wise Adagrad) + Adam for the rest.

    Collective (the planner agrees on one plan). Returns ``(dmp, optimizer)``; the optimizer
    is a TorchRec ``CombinedOptimizer`` whose state is keyed by parameter name.
    ``constraints`` (``table -> ParameterConstraints``) go to the planner, e.g. those of
    :func:`reckpt.sharding.plan.plan_constraints` to keep a resumed run's plan.
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
