"""Finding checkpoints in a model_dir (only committed ones count)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from reckpt.commit import checkpoint_state
from reckpt.errors import CheckpointNotFoundError, IncompleteCheckpointError
from reckpt.naming import CKPT_PREFIX, MODEL_DIR, OPTIMIZER_DIR, parse_step
from reckpt.storage import Storage, storage_for

__all__ = ["latest_checkpoint", "committed_steps"]


def committed_steps(model_dir: str, storage: Storage) -> list[int]:
    """Steps of the committed (or legacy) ``model.ckpt-<step>`` directories, ascending."""
    steps = []
    for name in storage.ls(model_dir):
        step = parse_step(name)
        if step is not None and checkpoint_state(storage, Storage.join(model_dir, name)) in (
            "committed",
            "legacy",
        ):
            steps.append(step)
    return sorted(steps)


def latest_checkpoint(
    model_dir: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[str | None, int]:
    """``(path, step)`` of the newest committed checkpoint, ``(None, -1)`` when there is none.

    TorchEasyRec semantics with its sharp edges fixed: an explicit checkpoint path
    (``…/model.ckpt-<step>``) is returned only when it is committed; only committed
    checkpoints count; names are parsed with one full-match parser. A legacy layout with
    ``model/`` or ``optimizer/`` directly in ``model_dir`` is returned as step 0.

    Raises:
        IncompleteCheckpointError: an explicit checkpoint path was never committed.
        CheckpointNotFoundError: an explicit checkpoint path does not exist.

    Example:
        >>> latest_checkpoint("memory://empty-run")
        (None, -1)
    """
    storage = storage_for(model_dir, storage_options)
    path = model_dir.rstrip("/") or model_dir
    step = parse_step(path)
    if step is not None:
        state = checkpoint_state(storage, path)
        if state == "absent":
            raise CheckpointNotFoundError(f"{path}: checkpoint does not exist")
        if state == "incomplete":
            raise IncompleteCheckpointError(f"{path}: checkpoint was never committed")
        return path, step
    steps = committed_steps(path, storage)
    if steps:
        return Storage.join(path, f"{CKPT_PREFIX}{steps[-1]}"), steps[-1]
    if any(storage.isdir(Storage.join(path, p)) for p in (MODEL_DIR, OPTIMIZER_DIR)):
        return path, 0
    return None, -1
