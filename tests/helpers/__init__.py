"""Small models and comparison helpers shared by the tests (no mocks)."""

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


def state_dicts_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Exact (bitwise) equality of two flat state dicts."""
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def optim_states_equal(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    if sa["state"].keys() != sb["state"].keys():
        return False
    return all(state_dicts_equal(sa["state"][i], sb["state"][i]) for i in sa["state"])


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


def flip_bit(checkpoint_dir: Any, at: int | None = None, part: str = "model") -> None:
    """Flip one bit of a checkpoint's first data file (default: in its middle)."""
    from pathlib import Path

    f = Path(checkpoint_dir) / part / "__0_0.distcp"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2 if at is None else at] ^= 1
    f.write_bytes(bytes(raw))
