"""Exact resume of a manager's run: the train state, and restoring a run's checkpoint.

:class:`TrainState` is a stateful object (``state_dict`` / ``load_state_dict``) saved as the
``train_state/`` part of a checkpoint. Its state dict holds the RNG states of *all* ranks
(gathered, so every rank writes the same dict), keyed by rank; on restore each rank takes
its own. When the world size grew, a new rank has no saved RNG state and keeps its own
(reported as missing keys).

:func:`restore_run` brings back everything :meth:`reckpt.CheckpointManager.save` wrote;
:func:`restore_newest` walks back from the newest checkpoint past those that do not verify.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from reckpt.dist import Dist
from reckpt.errors import IntegrityError, UnsafeCheckpointError
from reckpt.format.dataloader_state import restore_dataloader_state
from reckpt.naming import parse_step
from reckpt.report import LoadReport
from reckpt.restore.engine import restore_model

__all__ = ["TrainState", "TRAIN_STATE", "ResumeInfo", "manager_extras", "restore_run", "restore_newest"]

logger = logging.getLogger(__name__)

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


def restore_run(
    checkpoint_dir: str,
    model: Any,
    optimizer: Any,
    extras: Mapping[str, Any],
    train_state: TrainState,
    *,
    storage_options: Mapping[str, Any],
    process_group: Any,
    **kwargs: Any,
) -> ResumeInfo:
    """Collective: restore a checkpoint a manager saved, train state included, and its data position.

    Every rank restores its shard (:func:`reckpt.restore_model`; ``kwargs`` go there) and
    reads the dataloader state. ``extras`` are the manager's extra states
    (:func:`manager_extras`), holding ``train_state``: without a restored train state, the
    step comes from the checkpoint's name and the epoch is 0.
    """
    report = restore_model(
        checkpoint_dir,
        model,
        optimizer,
        extra_states=extras,
        storage_options=storage_options,
        process_group=process_group,
        **kwargs,
    )
    restored = report.parts.get(TRAIN_STATE)
    has_state = restored is not None and restored.skipped is None
    step = train_state.step if has_state else (parse_step(checkpoint_dir) or 0)
    path = checkpoint_dir.rstrip("/")
    dl_state = restore_dataloader_state(path, storage_options)
    return ResumeInfo(path, step, train_state.epoch if has_state else 0, dl_state, report)


def restore_newest(
    paths: Sequence[str],
    restore: Callable[[str], ResumeInfo],
    damaged: Callable[[str, Exception], None],
) -> ResumeInfo | None:
    """Collective (as ``restore``): restore the newest of ``paths`` (oldest first) that verifies.

    One that does not (a file fails its checksum, metadata is refused) is skipped with a
    warning and handed to ``damaged``; the next older one is tried. ``None``: no paths.

    Raises:
        IntegrityError: none verifies (the newest one's error; or ``UnsafeCheckpointError``).
    """
    first: Exception | None = None
    for path in reversed(paths):
        try:
            return restore(path)
        except (IntegrityError, UnsafeCheckpointError) as e:
            logger.warning("resume: skipping %s, it does not verify: %s", path, e)
            damaged(path, e)
            first = first or e
    if first is not None:
        raise first
    return None
