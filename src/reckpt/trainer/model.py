"""The trainer's model, its sharding (DistributedModelParallel on CPU) and optimizers.

The model is TorchRec's DLRM, kept under DLRM's module names (``sparse_arch``, ``dense_arch``,
``inter_arch``, ``over_arch``) so that its state-dict keys are DLRM's, plus what TorchEasyRec
models use next to the embedding bags: sequence features looked up in an
``EmbeddingCollection`` (``sequence_arch``) and mean-pooled per example, and dynamic tables
(``dynamic``, no parameters: saved in ``dynamicemb/``).

The model takes either ``(dense, sparse)`` and returns logits (eval, export, predict), or one
training batch (``dense``, ``sparse``, ``label``, ``weight`` attributes) and returns
``(loss, loss.detach())``, the shape TorchRec's train pipelines expect of a model. Both loops
(plain and pipelined) call the second form, so they compute the same thing.
"""

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

__all__ = [
    "init_distributed",
    "table_rows",
    "build_model",
    "shard_model",
    "table_name",
    "RecModel",
    "SequenceArch",
    "MeanPool",
    "DynamicLookups",
]


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
    """Rows per table of every sparse and sequence column (ids are reduced modulo this)."""
    return {
        c: DYNAMIC_ROWS
        if c in cfg.model.dynamic_tables
        else cfg.model.table_sizes.get(c, cfg.model.num_embeddings)
        for c in [*cfg.data.sparse_columns, *cfg.data.sequence_columns]
    }


def build_model(cfg: Config, device: str = "cpu") -> nn.Module:
    """The plain (unsharded) model of ``cfg``: a :class:`RecModel`."""
    return RecModel(cfg, torch.device(device))


class MeanPool(nn.Module):
    """The mean of each example's looked-up rows, per sequence feature: ``(B, S, D)``.

    An example with an empty sequence pools to zeros. It has no parameters; TorchRec's
    pipeline tracer treats it as a leaf (it is not traced into).
    """

    def __init__(self, features: list[str]) -> None:
        super().__init__()
        self.features = list(features)

    def forward(self, embeddings: dict[str, Any]) -> torch.Tensor:
        pooled = []
        for f in self.features:
            jt = embeddings[f]
            values, lengths = jt.values(), jt.lengths().to(torch.int64)
            rows = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
            sums = torch.zeros(lengths.numel(), values.shape[1], dtype=values.dtype).index_add(
                0, rows, values
            )
            pooled.append(sums / lengths.clamp(min=1).unsqueeze(1).to(values.dtype))
        return torch.stack(pooled, 1)


class SequenceArch(nn.Module):
    """Sequence features: an ``EmbeddingCollection`` lookup (one row per id), mean-pooled."""

    def __init__(self, embedding_collection: nn.Module, features: list[str]) -> None:
        super().__init__()
        self.embedding_collection = embedding_collection
        self.pool = MeanPool(features)

    def forward(self, features: Any) -> torch.Tensor:
        pooled: torch.Tensor = self.pool(self.embedding_collection(features))
        return pooled


class DynamicLookups(nn.ModuleDict):
    """The dynamic tables (``dynamic.<feature>``), each pooled to one row per example: ``(B, K, D)``."""

    def forward(self, features: Any) -> torch.Tensor:
        jts = features.to_dict()
        return torch.stack([emb(jts[f]) for f, emb in self.items()], 1)


class RecModel(nn.Module):
    """TorchRec's DLRM under DLRM's names, with sequence features and dynamic tables.

    The interaction takes one pooled embedding per feature: the bags' (``sparse_arch``), the
    sequences' (``sequence_arch``, mean-pooled) and the dynamic tables' (``dynamic``), in this
    order. Without sequence features and dynamic tables the module tree, the state-dict keys
    and the computation are those of ``torchrec.models.dlrm.DLRM``.
    """

    def __init__(self, cfg: Config, device: torch.device) -> None:
        super().__init__()
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
        from torchrec.models.dlrm import DenseArch, InteractionArch, OverArch, SparseArch

        rows, dim = table_rows(cfg), cfg.model.embedding_dim
        bags = [c for c in cfg.data.sparse_columns if c not in cfg.model.dynamic_tables]
        ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=table_name(c), embedding_dim=dim, num_embeddings=rows[c], feature_names=[c]
                )
                for c in bags
            ],
            device=device,
        )
        n = len(bags) + len(cfg.data.sequence_columns) + len(cfg.model.dynamic_tables)
        self.sparse_arch = SparseArch(ebc)
        self.dense_arch = DenseArch(
            in_features=len(cfg.data.dense_columns), layer_sizes=list(cfg.model.bottom_mlp), device=device
        )
        self.inter_arch = InteractionArch(num_sparse_features=n)
        self.over_arch = OverArch(
            in_features=dim + n * (n - 1) // 2 + n, layer_sizes=list(cfg.model.top_mlp), device=device
        )
        self.sequence_arch: SequenceArch | None = None
        if cfg.data.sequence_columns:
            self.sequence_arch = SequenceArch(_embedding_collection(cfg, device), cfg.data.sequence_columns)
        self.dynamic: DynamicLookups | None = None
        if cfg.model.dynamic_tables:
            self.dynamic = _dynamic_lookups(cfg)

    def forward(self, inputs: Any, sparse: Any = None) -> Any:
        """``(dense, sparse)`` -> logits ``(B, 1)``; a training batch -> ``(loss, loss.detach())``.

        A batch's ``weight`` (1 per real row, 0 for a stand-in row) scales its rows' losses, so
        a stand-in step learns nothing. The branch is on the type of ``inputs``: TorchRec's
        pipeline tracer passes a proxy (not a tensor) and so sees the batch form.
        """
        if isinstance(inputs, torch.Tensor):
            return self.logits(inputs, sparse)
        logits = self.logits(inputs.dense, inputs.sparse).squeeze(-1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, inputs.label, weight=inputs.weight)
        return loss, loss.detach()

    def logits(self, dense: torch.Tensor, sparse: Any) -> torch.Tensor:
        embedded_dense = self.dense_arch(dense)
        pooled = [self.sparse_arch(sparse)]
        if self.sequence_arch is not None:
            pooled.append(self.sequence_arch(sparse))
        if self.dynamic is not None:
            pooled.append(self.dynamic(sparse))
        embedded_sparse = pooled[0] if len(pooled) == 1 else torch.cat(pooled, 1)
        inter = self.inter_arch(dense_features=embedded_dense, sparse_features=embedded_sparse)
        out: torch.Tensor = self.over_arch(inter)
        return out


def _embedding_collection(cfg: Config, device: torch.device) -> nn.Module:
    from torchrec import EmbeddingCollection, EmbeddingConfig

    rows = table_rows(cfg)
    ec: nn.Module = EmbeddingCollection(
        tables=[
            EmbeddingConfig(
                name=table_name(c),
                embedding_dim=cfg.model.embedding_dim,
                num_embeddings=rows[c],
                feature_names=[c],
            )
            for c in cfg.data.sequence_columns
        ],
        device=device,
    )
    return ec


def _dynamic_lookups(cfg: Config) -> DynamicLookups:
    from reckpt.dynamic.module import DynamicEmbedding

    lr = cfg.train_config.sparse_learning_rate
    return DynamicLookups(
        {
            f: DynamicEmbedding(
                cfg.model.embedding_dim,
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


def shard_model(
    cfg: Config, model: nn.Module, constraints: dict[str, Any] | None = None
) -> tuple[nn.Module, Any]:
    """Shard the tables with DistributedModelParallel (fused row-wise Adagrad) + Adam for the rest.

    Collective (the planner agrees on one plan). Returns ``(dmp, optimizer)``; the optimizer
    is a TorchRec ``CombinedOptimizer`` whose state is keyed by parameter name.
    ``constraints`` (``table -> ParameterConstraints``) go to the planner, e.g. those of
    :func:`reckpt.sharding.plan.plan_constraints` to keep a resumed run's plan.
    """
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    t = cfg.train_config
    tables: list[Any] = [*model.get_submodule("sparse_arch.embedding_bag_collection").parameters()]
    if cfg.data.sequence_columns:
        tables += model.get_submodule("sequence_arch.embedding_collection").parameters()
    apply_optimizer_in_backward(RowWiseAdagrad, tables, {"lr": t.sparse_learning_rate})
    sharders: list[Any] = [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]
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
