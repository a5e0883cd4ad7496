"""Checkpoint and staging names (pure: no I/O).

TorchEasyRec names a checkpoint ``model.ckpt-<step>`` where ``<step>`` is the
0-based global step index at save time (a resumed run continues at step + 1).
reckpt keeps that name so existing model_dirs and tools keep working, and parses
it with one full-match function, fixing TorchEasyRec's lenient parser:

==============================  ======================  =======================
name                            TorchEasyRec            :func:`parse_step`
==============================  ======================  =======================
``model.ckpt-100``              100                     100
``model.ckpt-100/``             0                       100
``model.ckpt-100.bak``          100                     ``None``
``model.ckpt-abc``              0                       ``None``
``model.ckpt-1.5``              1                       ``None``
``.reckpt-staging.ab12``       (not globbed)           ``None``
==============================  ======================  =======================

Staging and trash directories start with ``.reckpt-`` so that neither reckpt's
parser nor TorchEasyRec's ``model.ckpt-*`` glob ever takes them for checkpoints.
"""

from __future__ import annotations

import re

from reckpt.errors import ConfigError

CKPT_PREFIX = "model.ckpt-"
DELTA_PREFIX = "model.delta-"
DYNAMICEMB_DIR = "dynamicemb"
DELTA_ROWS_DIR = "delta_rows"
MODEL_DIR = "model"
OPTIMIZER_DIR = "optimizer"
DENSE_EMA_DIR = "dense_ema"
PLAN_FILE = "plan"
META_FILE = "meta"
DATALOADER_STATE_FILE = "dataloader_state.json"
MANIFEST_FILE = "reckpt.json"
IN_PROGRESS_MARKER = ".reckpt-in-progress"
DELETING_MARKER = ".reckpt-deleting"
OWNER_FILE = ".reckpt-owner.json"
REPLACE_RECORD = ".reckpt-replace.json"  # in a checkpoint being replaced, then in its trash
SIDECAR_PREFIX = "reckpt."
SIDECAR_SUFFIX = ".sidecar.json"
DCP_METADATA_FILE = ".metadata"
DCP_DATA_SUFFIX = ".distcp"  # DCP's data files (``__<rank>_<n>.distcp``)

_STEP_RE = re.compile(r"model\.ckpt-(0|[1-9][0-9]*)")
_DELTA_RE = re.compile(r"model\.delta-(0|[1-9][0-9]*)")
_STAGING_RE = re.compile(r"\.reckpt-staging\.([0-9a-f]+)")
_TRASH_RE = re.compile(r"\.reckpt-trash\.([0-9a-f]+)")
_RESERVED_EXTRA = {
    MODEL_DIR,
    OPTIMIZER_DIR,
    PLAN_FILE,
    META_FILE,
    DATALOADER_STATE_FILE,
    DYNAMICEMB_DIR,
    DELTA_ROWS_DIR,
}
_EXTRA_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


def basename(path: str) -> str:
    """Last path component, ignoring trailing separators (``"a/b/"`` -> ``"b"``)."""
    return path.rstrip("/").rsplit("/", 1)[-1]


def checkpoint_name(step: int) -> str:
    """``checkpoint_name(100) == "model.ckpt-100"``; ``step`` must be a non-negative int."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ConfigError(f"step must be a non-negative int, got {step!r}")
    return f"{CKPT_PREFIX}{step}"


def parse_step(path: str) -> int | None:
    """Step of a checkpoint path or name, or ``None`` when it is not one (see table)."""
    match = _STEP_RE.fullmatch(basename(path))
    return int(match.group(1)) if match else None


def delta_name(step: int) -> str:
    """``delta_name(150) == "model.delta-150"``: an incremental checkpoint (never ``model.ckpt-``,
    which TorchEasyRec would load as a whole model)."""
    checkpoint_name(step)  # same validation
    return f"{DELTA_PREFIX}{step}"


def parse_delta_step(path: str) -> int | None:
    """Step of a ``model.delta-<step>`` path or name, else ``None`` (same rules as :func:`parse_step`)."""
    match = _DELTA_RE.fullmatch(basename(path))
    return int(match.group(1)) if match else None


def parse_any_step(path: str) -> int | None:
    """Step of a full (``model.ckpt-``) or delta (``model.delta-``) checkpoint name, else ``None``."""
    step = parse_step(path)
    return step if step is not None else parse_delta_step(path)


def staging_name(token: str) -> str:
    """Name of the sibling directory a save writes into before it is renamed into place."""
    return f".reckpt-staging.{token}"


def is_staging(name: str) -> bool:
    """Whether a directory name is a staging directory."""
    return _STAGING_RE.fullmatch(basename(name)) is not None


def trash_name(token: str) -> str:
    """Name a checkpoint is renamed to before it is deleted (overwrite, prune)."""
    return f".reckpt-trash.{token}"


def is_trash(name: str) -> bool:
    """Whether a directory name is a trash directory."""
    return _TRASH_RE.fullmatch(basename(name)) is not None


def sidecar_name(kind: str) -> str:
    """File name of a mutable sidecar, e.g. ``sidecar_name("metrics")``."""
    if not _EXTRA_NAME_RE.fullmatch(kind):
        raise ConfigError(f"sidecar kind {kind!r} must match {_EXTRA_NAME_RE.pattern}")
    return f"{SIDECAR_PREFIX}{kind}{SIDECAR_SUFFIX}"


def is_sidecar(name: str) -> bool:
    """Whether a file name is a sidecar (excluded from the manifest's checksums)."""
    return name.startswith(SIDECAR_PREFIX) and name.endswith(SIDECAR_SUFFIX)


def validate_extra_name(name: str) -> str:
    """Check the directory name of an extra stateful object (``"lr_scheduler"``...)."""
    if not _EXTRA_NAME_RE.fullmatch(name) or name in _RESERVED_EXTRA or name.startswith("reckpt"):
        raise ConfigError(
            f"extra state name {name!r} is not usable as a checkpoint entry: use letters, digits,"
            f" '_' or '-', not starting with 'reckpt', and none of {sorted(_RESERVED_EXTRA)}"
        )
    return name
