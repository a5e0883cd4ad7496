"""A tiny recommender and its optimizer, trained or fresh: the model most tests save and restore."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class TinyRec(nn.Module):
    """An embedding table plus a dense tower: the shape of a recommender, in miniature."""

    def __init__(self, rows: int = 50, dim: int = 4, table: str = "user", extra: bool = False) -> None:
        super().__init__()
        self.emb = nn.ModuleDict({table: nn.Embedding(rows, dim)})
        self.table = table
        self.tower = nn.Sequential(nn.Linear(dim, 8), nn.ReLU(), nn.Linear(8, 1))
        self.extra = nn.Linear(1, 1) if extra else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.tower(self.emb[self.table](ids))
        return self.extra(out) if self.extra is not None else out


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 50, (16,), generator=g)
        opt.zero_grad()
        model(ids).pow(2).mean().backward()
        opt.step()


def trained(seed: int = 0, **kw: Any) -> tuple[TinyRec, torch.optim.Adam]:
    torch.manual_seed(seed)
    m = TinyRec(**kw)
    o = torch.optim.Adam(m.parameters(), lr=0.05)
    train(m, o)
    return m, o


def fresh(seed: int = 99, lr: float = 0.5, **kw: Any) -> tuple[TinyRec, torch.optim.Adam]:
    torch.manual_seed(seed)
    m = TinyRec(**kw)
    return m, torch.optim.Adam(m.parameters(), lr=lr)


def adagrad(m: nn.Module) -> torch.optim.Optimizer:
    """Adagrad: a zero gradient leaves a row and its accumulator unchanged, so only looked-up
    rows change and a delta checkpoint of them is lossless."""
    return torch.optim.Adagrad(m.parameters(), lr=0.1)


def flat_training_state(m: nn.Module, o: torch.optim.Optimizer) -> dict[str, Any]:
    """Model and optimizer state in one flat dict: ``model/<key>``, ``optim/<parameter>/<leaf>``."""
    from reckpt.optim import optimizer_state_dict

    out = {f"model/{k}": v for k, v in m.state_dict().items()}
    for name, st in optimizer_state_dict(m, o)["state"].items():
        out.update({f"optim/{name}/{k}": v for k, v in st.items()})
    return out
