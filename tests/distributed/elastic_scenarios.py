"""Gloo scenarios of elastic resume: the trainer's model restored on another number of processes."""

from __future__ import annotations

from typing import Any

import torch

import reckpt
from reckpt.restore.inspection import read_part
from reckpt.trainer.config import load_config
from reckpt.trainer.model import build_model, shard_model
from reckpt.trainer.train import restore_constraints
from tests.helpers.sharded import gather_all


def flat_optimizer_state(optimizer: Any) -> dict[str, Any]:
    """An optimizer's per-parameter state under the checkpoint's flattened keys
    (``state.<parameter fqn>.<state name>``)."""
    return {
        f"state.{fqn}.{name}": value
        for fqn, per_param in optimizer.state_dict()["state"].items()
        for name, value in per_param.items()
    }


def restore_matches_checkpoint(rank: int, world: int, config: str, checkpoint: str) -> None:
    """The trainer's model and optimizer on ``world`` processes, restored from ``checkpoint``
    (saved on another number), hold exactly the checkpoint's tensors: gathered from every
    rank's shards, each equals the tensor the checkpoint stores."""
    cfg = load_config(config)
    torch.manual_seed(1234 + rank)  # a different initial state than the checkpoint's
    # the trainer's own constraints: a changed world size keeps every table's sharding type
    model, optimizer = shard_model(cfg, build_model(cfg), restore_constraints(checkpoint, world, rank))
    reckpt.restore_model(checkpoint, model, optimizer, strict_shapes=True)
    for part, live in (("model", dict(model.state_dict())), ("optimizer", flat_optimizer_state(optimizer))):
        saved = {k: v for k, v in read_part(checkpoint, part).items() if isinstance(v, torch.Tensor)}
        got = gather_all(live)
        missing = sorted(set(saved) - set(got))
        assert not missing, f"rank {rank}/{world}: {part} keys not restored: {missing}"
        differ = sorted(k for k in saved if not torch.equal(saved[k], got[k]))
        assert not differ, f"rank {rank}/{world}: {part} tensors differ from {checkpoint}: {differ}"
