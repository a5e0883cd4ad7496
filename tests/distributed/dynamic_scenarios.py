"""Dynamic-table scenarios for tests/distributed/test_dynamic.py (run on real gloo groups)."""

from __future__ import annotations

import torch
import torch.distributed as dist

import reckpt
from reckpt.dynamic import DynamicEmbedding

BAGS, STEPS = 24, 5


def make_tables() -> dict[str, DynamicEmbedding]:
    return {
        "user": DynamicEmbedding(4, name="user", admit_threshold=2, eviction="lfu", lr=0.2, seed=5),
        "item": DynamicEmbedding(3, name="item", mode="mean", lr=0.1, seed=6),
    }


class Pair(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        tables = make_tables()
        self.user, self.item = tables["user"], tables["item"]


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, offsets, weights)`` of BAGS bags (1-3 ids, Zipf-ish, some negative and huge)."""
    g = torch.Generator().manual_seed(100 + step)
    lengths = torch.randint(1, 4, (BAGS,), generator=g)
    ids = (torch.randint(0, 60, (int(lengths.sum()),), generator=g) ** 2 - 900) * (1 << 33) + 7
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return ids, offsets, torch.randn(BAGS, generator=g)


def local_slice(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, offsets, weights = global_batch(step)
    per = BAGS // world
    lo, hi = rank * per, (rank + 1) * per
    return ids[offsets[lo] : offsets[hi]], offsets[lo : hi + 1] - offsets[lo], weights[lo:hi]


def train(model: Pair, rank: int, world: int, steps: int = STEPS) -> None:
    """Sum-of-bags loss, so that the gradients of all ranks add up to the one-process gradient."""
    for s in range(steps):
        ids, offsets, w = local_slice(s, rank, world)
        loss = (model.user(ids, offsets).sum(dim=1) * w).pow(2).sum()
        loss = loss + (model.item(ids // 3, offsets) * w.unsqueeze(1)).sum()
        torch.autograd.backward(loss)


def train_and_save(rank: int, world: int, ckpt: str) -> None:
    model = Pair()
    train(model, rank, world)
    for m in (model.user, model.item):
        assert all(k % world == rank for k in m.table.slot_of), "a rank holds a key it does not own"
        assert all(k % world == rank for k in m.table.counter)
    assert not model.state_dict()
    reckpt.save_model(ckpt, model)
    dist.barrier()


def restore_and_save(rank: int, world: int, src: str, dst: str) -> None:
    """Restore a dump of another world size, check ownership, save again (world size ``world``)."""
    model = Pair()
    report = reckpt.restore_model(src, model, torch.optim.SGD([torch.zeros(1, requires_grad=True)]))
    assert report.parts["dynamicemb"].loaded == ["model.item/item", "model.user/user"]
    for m in (model.user, model.item):
        assert all(k % world == rank for k in m.table.slot_of)
    reckpt.save_model(dst, model)


def corrupt_restore(rank: int, world: int, src: str) -> None:
    """A truncated shard: every rank raises the same clear error, and no table changed."""
    model = Pair()
    train(model, rank, world, steps=1)
    before = model.user.table.export()
    try:
        reckpt.restore_model(src, model, verify=False)
    except reckpt.errors.IntegrityError as e:
        assert "user_emb_values.rank_1.world_size_2" in str(e), str(e)
    else:
        raise AssertionError("a truncated shard was loaded")
    after = model.user.table.export()
    assert torch.equal(before.keys, after.keys) and torch.equal(before.values, after.values)
