"""What reckpt may delete or replace inside a checkpoint folder (pure: no I/O).

reckpt deletes or replaces only what it wrote and can recognise as its own. A
checkpoint folder may hold other files (TorchEasyRec's tests write ``mapping.txt`` into
the folder and then save there; users keep notes next to the weights); those are
*foreign* and every destructive path (overwrite, prune, debris cleanup, ``reckpt
prune``) leaves them byte for byte.

The top-level entries of a checkpoint folder that reckpt owns:

=========================================================  ==================================
entry                                                      why it is reckpt's
=========================================================  ==================================
``.reckpt-*`` (markers, owner and replace records)         reckpt's internal names
``reckpt.json``, ``reckpt.<kind>.sidecar.json``            the manifest and its sidecars
``model/``, ``optimizer/``, ``dense_ema/``, ``plan``,      TorchEasyRec's checkpoint members,
``meta``, ``dataloader_state.json``, ``dynamicemb/``,      which its own save overwrites too
``delta_rows/``
top-level names of the manifest's files                    extra-state folders of a save
                                                           (``train_state/``, ``lr_scheduler/``)
names a marker records (a save or deletion in progress)    what that save or deletion writes
``<owned name>.tmp-<pid>-<hex>``                           an atomic replace of an owned file
=========================================================  ==================================

Everything else is foreign.

A folder is a *model_dir* (never a checkpoint target) when it holds committed
``model.ckpt-*`` / ``model.delta-*`` checkpoints or an eval results file: saving there
would mix a checkpoint into a run's root.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable

from reckpt.naming import (
    DATALOADER_STATE_FILE,
    DELTA_ROWS_DIR,
    DENSE_EMA_DIR,
    DYNAMICEMB_DIR,
    MANIFEST_FILE,
    META_FILE,
    MODEL_DIR,
    OPTIMIZER_DIR,
    PLAN_FILE,
    is_sidecar,
)

__all__ = [
    "MEMBER_NAMES",
    "EVAL_RESULT_NAMES",
    "is_internal",
    "is_owned",
    "foreign_names",
    "manifest_members",
    "temp_base",
    "temp_writer_pid",
]

MEMBER_NAMES = frozenset(
    {
        MODEL_DIR,
        OPTIMIZER_DIR,
        DENSE_EMA_DIR,
        PLAN_FILE,
        META_FILE,
        DATALOADER_STATE_FILE,
        DYNAMICEMB_DIR,
        DELTA_ROWS_DIR,
    }
)
"""TorchEasyRec's (and reckpt's fixed) checkpoint member names."""

EVAL_RESULT_NAMES = frozenset({"train_eval_result_v2.txt", "eval_result.txt"})
"""TorchEasyRec's eval results files: their presence marks a model_dir."""

_TEMP_RE = re.compile(r"(.+)\.tmp-([0-9]+)-[0-9a-f]+")


def temp_base(name: str) -> str | None:
    """The file an atomic-replace temporary (``<name>.tmp-<pid>-<hex>``) stands for, else ``None``.

    Examples:
        >>> temp_base("reckpt.metrics.sidecar.json.tmp-41-0a1b2c3d")
        'reckpt.metrics.sidecar.json'
        >>> temp_base("notes.txt") is None
        True
    """
    m = _TEMP_RE.fullmatch(name)
    return m.group(1) if m else None


def temp_writer_pid(name: str) -> int | None:
    """The pid of the process that wrote an atomic-replace temporary, else ``None``.

    Example:
        >>> temp_writer_pid("reckpt.metrics.sidecar.json.tmp-41-0a1b2c3d")
        41
    """
    m = _TEMP_RE.fullmatch(name)
    return int(m.group(2)) if m else None


def is_internal(name: str) -> bool:
    """reckpt's own bookkeeping: ``.reckpt-*``, the manifest, sidecars, and their temporaries."""
    base = temp_base(name) or name
    return base.startswith(".reckpt-") or base == MANIFEST_FILE or is_sidecar(base)


def is_owned(name: str, members: Collection[str] = ()) -> bool:
    """Whether reckpt may delete or replace the top-level entry ``name`` (see module table).

    ``members`` are the names the checkpoint's manifest or an in-progress marker records.

    Examples:
        >>> is_owned("model"), is_owned("notes.txt"), is_owned("lr_scheduler", {"lr_scheduler"})
        (True, False, True)
    """
    base = temp_base(name) or name
    return is_internal(name) or base in MEMBER_NAMES or base in members


def foreign_names(names: Iterable[str], members: Collection[str] = ()) -> list[str]:
    """The entries of ``names`` reckpt did not write (sorted)."""
    return sorted(n for n in names if not is_owned(n, members))


def manifest_members(files: Iterable[str]) -> set[str]:
    """Top-level names of a manifest's file paths (``"lr_scheduler/__0_0.distcp"`` -> ``"lr_scheduler"``)."""
    return {path.split("/", 1)[0] for path in files}
