"""TorchRec models for the gloo scenarios: an EmbeddingBagCollection, a CPU row-wise sharder,
and a whole-tensor snapshot of a sharded model and its optimizer (torchrec imported lazily)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from reckpt.sharding.fused_state import flat_state
from tests.helpers.sharded import gather_all


def weight_key(t: str) -> str:
    """The state-dict key of table ``t`` of :func:`ebc_model`."""
    return f"ebc.embedding_bags.{t}.weight"


def momentum_key(t: str) -> str:
    """The ``flat_state`` key of table ``t``'s fused optimizer state (row-wise or element-wise)."""
    return f"state.{weight_key(t)}.{t}.momentum1"


def ebc_model(tables: Mapping[str, tuple[int, int]]) -> nn.Module:
    """A module holding one EmbeddingBagCollection ``ebc``: one ``(rows, dim)`` table per name,
    feature ``f_<name>``."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ebc = EmbeddingBagCollection(
                tables=[
                    EmbeddingBagConfig(name=t, embedding_dim=d, num_embeddings=r, feature_names=[f"f_{t}"])
                    for t, (r, d) in tables.items()
                ],
                device=torch.device("cpu"),
            )

        def forward(self, kjt: Any) -> torch.Tensor:
            return self.ebc(kjt).values()

    return Wrap()


def row_sharder() -> Any:
    """TorchRec's bag sharder with ``row_wise`` allowed on CPU (the planner refuses it there)."""
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    class RowWiseOnCpu(EmbeddingBagCollectionSharder):
        def sharding_types(self, compute_device_type: str) -> list[str]:
            return [*super().sharding_types(compute_device_type), "row_wise"]

    return RowWiseOnCpu()


def snapshot(dmp: Any, opt: Any, tables: Iterable[str]) -> dict[str, torch.Tensor]:
    """Whole tensors, on every rank: the tables' weights and every optimizer state leaf (keys as
    ``flat_state`` names them)."""
    sd = dmp.state_dict()
    out = gather_all({weight_key(t): sd[weight_key(t)] for t in tables})
    out.update(gather_all({k: v for k, _, _, v in flat_state(opt.state_dict())}))
    return out
