"""The first phase of a restore, *resolve*: which checkpoint, on which storage, with what options.

:func:`resolve_target` turns the public arguments (a path and fsspec options) into a
:class:`Target` (the storage opened once, the commit state, the manifest) that every later
phase, and every link of a delta chain, shares. :class:`RestoreOptions` carries the
caller's choices of :func:`reckpt.restore_model` unchanged from phase to phase.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from reckpt.dist import Dist
from reckpt.errors import ConfigError
from reckpt.format.manifest import Manifest, read_manifest
from reckpt.format.verification import require_committed
from reckpt.remap import RenameRule
from reckpt.storage.core import Storage, storage_for

__all__ = ["RestoreOptions", "Target", "resolve_target"]


@dataclass(frozen=True, slots=True)
class RestoreOptions:
    """What :func:`reckpt.restore_model` was asked to do (see its arguments), minus the target."""

    ckpt_param_map_path: str | None = None
    error_on_missing_keys: bool = False
    dense_ema: Any = None
    use_dense_ema: bool = False
    extra_states: Mapping[str, Any] | None = None
    load_optimizer: bool = True
    verify: bool | str = True
    strict_shapes: bool = False
    allow_row_resize: bool = False
    param_map: Mapping[str, str] | None = None
    rename_rules: Sequence[RenameRule] = field(default_factory=tuple)
    lenient_param_map: bool = False
    storage_options: Mapping[str, Any] | None = None  # for ckpt_param_map_path, a path of its own


@dataclass(frozen=True, slots=True)
class Target:
    """One committed checkpoint to restore, on its opened storage.

    Attributes:
        path: the checkpoint directory (no trailing ``/``).
        storage: its storage (shared by every phase and every link of a chain).
        state: its commit state (``committed`` or ``legacy``).
        manifest: its manifest, ``None`` for a legacy checkpoint.
        d: the ranks taking part.
    """

    path: str
    storage: Storage
    state: str
    manifest: Manifest | None
    d: Dist

    @property
    def is_delta(self) -> bool:
        """Whether this is a delta checkpoint (``model.delta-<step>``) with a chain to follow."""
        return self.manifest is not None and self.manifest.delta is not None


def resolve_target(
    checkpoint_dir: str,
    *,
    verify: bool | str,
    storage_options: Mapping[str, Any] | None,
    process_group: Any,
) -> Target:
    """Open the checkpoint's storage (once per restore) and read its commit state and manifest.

    Local to each rank: no collective. Every rank reads the same small files.

    Raises:
        ConfigError: ``verify`` is not ``True``, ``False`` or ``"first"``.
        CheckpointNotFoundError: nothing is committed at ``checkpoint_dir``.
        IncompleteCheckpointError: the checkpoint was never committed.
        IntegrityError: with ``verify``, the manifest's own checksum does not match.
    """
    if verify not in (True, False, "first"):
        raise ConfigError(f"verify={verify!r}: expected True, False or 'first'")
    d = Dist(process_group)
    ckpt = checkpoint_dir.rstrip("/") or checkpoint_dir
    storage = storage_for(ckpt, storage_options)
    state = require_committed(storage, ckpt)
    return Target(ckpt, storage, state, read_manifest(storage, ckpt, check=bool(verify)), d)
