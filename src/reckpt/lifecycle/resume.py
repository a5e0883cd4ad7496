"""Train state for exact resume: step, epoch and every rank's RNG states.

:class:`TrainState` is a stateful object (``state_dict`` / ``load_state_dict``) saved as the
``train_state/`` part of a checkpoint. Its state dict holds the RNG states of *all* ranks
(gathered, so every rank writes the same dict), keyed by rank; on restore each rank takes
its own. When the world size grew, a new rank has no saved RNG state and keeps its own
(reported as missing keys).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from reckpt.dist import Dist
from reckpt.report import LoadReport

__all__ = ["TrainState", "TRAIN_STATE", "ResumeInfo", "manager_extras"]

TRAIN_STATE = "train_state"


def _rng_state() -> dict[str, Any]:
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (str(kind), [int(k) for k in keys], int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class TrainState:
    """Step, epoch and RNG states of a run; collective ``state_dict()`` (gathers RNG states).

    Args:
        step: the global step of the checkpoint.
        epoch: completed epochs (or the current epoch index; the trainer decides).
        process_group: the group whose ranks' RNG states are gathered.
    """

    def __init__(self, step: int = 0, epoch: int = 0, process_group: Any = None) -> None:
        self.step = step
        self.epoch = epoch
        self._dist = Dist(process_group)
        self.restored_rng = False

    def state_dict(self) -> dict[str, Any]:
        """Collective: every rank returns the same dict, holding all ranks' RNG states."""
        states = self._dist.all_gather(_rng_state())
        sd: dict[str, Any] = {"step": int(self.step), "epoch": int(self.epoch)}
        for rank, rng in enumerate(states):
            for kind, value in rng.items():
                sd[f"rng.{rank}.{kind}"] = value
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step = int(sd["step"])
        self.epoch = int(sd["epoch"])
        prefix = f"rng.{self._dist.rank}."
        mine = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        _set_rng_state(mine)
        self.restored_rng = bool(mine)


@dataclass(frozen=True, slots=True)
class ResumeInfo:
    """What :meth:`CheckpointManager.restore` brought back.

    Attributes:
        path: the checkpoint restored.
        step: its step; training continues at ``step + 1``.
        epoch: the epoch saved with it (0 when the checkpoint has no train state).
        dataloader_state: the data position (``None`` when not saved).
        report: the load report.
    """

    path: str
    step: int
    epoch: int
    dataloader_state: dict[str, Any] | None
    report: LoadReport


def manager_extras(
    extra_states: Mapping[str, Any] | None, lr_scheduler: Any, grad_scaler: Any, train_state: TrainState
) -> dict[str, Any]:
    """The extra stateful parts every manager checkpoint carries, by their directory names."""
    extras = dict(extra_states or {})
    for name, obj in (("lr_scheduler", lr_scheduler), ("grad_scaler", grad_scaler)):
        if obj is not None:
            extras[name] = obj
    extras[TRAIN_STATE] = train_state
    return extras
