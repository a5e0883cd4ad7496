"""State spread over the ranks of a process group: whole tensors on every rank, this rank's
shards, a fused optimizer's momentum. Call the gathering helpers on every rank (collectives)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    box: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(box, obj)
    return box


def gather_all(items: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Whole tensors of (sharded or replicated) values, on every rank; ranks may hold other keys."""
    local: dict[str, tuple[tuple[int, ...], list[tuple[tuple[int, ...], torch.Tensor]]]] = {}
    for key, value in items.items():
        if hasattr(value, "local_shards"):
            pieces = [(tuple(s.metadata.shard_offsets), s.tensor.clone()) for s in value.local_shards()]
            local[key] = (tuple(value.size()), pieces)
        elif isinstance(value, torch.Tensor) and value.numel() > 0:
            local[key] = (tuple(value.shape), [((0,) * value.dim(), value.detach().clone())])
    out: dict[str, torch.Tensor] = {}
    for per_rank in all_gather_objects(local):
        for key, (shape, pieces) in per_rank.items():
            full = out.setdefault(key, torch.zeros(shape, dtype=pieces[0][1].dtype if pieces else None))
            for off, t in pieces:
                full[tuple(slice(o, o + n) for o, n in zip(off, t.shape, strict=True))] = t
    return out


def local_shards(value: Any) -> list[torch.Tensor]:
    """Copies of this rank's shards of a ``ShardedTensor`` (none where it holds no shard)."""
    return [s.tensor.clone() for s in value.local_shards()]


def momentum_states(opt: Any) -> dict[str, Any]:
    """A (fused) optimizer's momentum leaves, keyed ``<parameter fqn>.<state name>`` (row-wise
    Adagrad: ``<table>.momentum1``); a rank holding no shard of a table has none of its keys."""
    return {
        f"{fqn}.{name}": value
        for fqn, st in opt.state_dict()["state"].items()
        for name, value in st.items()
        if "momentum" in name
    }


def local_momentum(opt: Any) -> dict[str, list[torch.Tensor]]:
    """This rank's shards of every momentum leaf of ``opt`` (see :func:`momentum_states`)."""
    return {key: local_shards(value) for key, value in momentum_states(opt).items()}
