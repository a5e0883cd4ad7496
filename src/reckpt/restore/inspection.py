"""What a checkpoint holds: entry names, shapes, dtypes and sizes, per part."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from reckpt.dcp.reader import read_dcp_metadata
from reckpt.errors import CheckpointNotFoundError
from reckpt.format.manifest import TensorEntry, entries_from_metadata, read_manifest
from reckpt.naming import DCP_METADATA_FILE, MODEL_DIR, OPTIMIZER_DIR
from reckpt.storage.core import Storage, storage_for

__all__ = ["list_distcp_param", "inspect_checkpoint", "CheckpointContents", "read_part", "part_values"]

logger = logging.getLogger(__name__)


def list_distcp_param(checkpoint_dir: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Names of the tensor entries of a checkpoint (TorchEasyRec's tool, compat §5.6).

    If ``checkpoint_dir`` is itself a DCP directory (holds ``.metadata``) it is listed;
    otherwise its ``model/`` then ``optimizer/``. Non-tensor entries are left out.

    Raises:
        CheckpointNotFoundError: neither form holds DCP metadata.
    """
    storage = storage_for(checkpoint_dir, storage_options)
    if storage.exists(Storage.join(checkpoint_dir, DCP_METADATA_FILE)):
        dirs = [checkpoint_dir]
    else:
        dirs = [
            Storage.join(checkpoint_dir, p)
            for p in (MODEL_DIR, OPTIMIZER_DIR)
            if storage.exists(Storage.join(checkpoint_dir, p, DCP_METADATA_FILE))
        ]
    if not dirs:
        raise CheckpointNotFoundError(
            f"{checkpoint_dir}: no DCP checkpoint here (neither .metadata nor model/ or optimizer/)"
        )
    names = []
    for dcp_dir in dirs:
        for entry in entries_from_metadata(read_dcp_metadata(storage, dcp_dir)):
            if entry.shape is not None:
                logger.info("%s: %s %s %s", dcp_dir, entry.name, entry.shape, entry.dtype)
                names.append(entry.name)
    return names


@dataclass(frozen=True, slots=True)
class CheckpointContents:
    """Every entry of a checkpoint, grouped by part (``model``, ``optimizer``, extras)."""

    checkpoint: str
    parts: dict[str, list[TensorEntry]]

    def total_bytes(self) -> int:
        return sum(e.bytes for entries in self.parts.values() for e in entries)


def inspect_checkpoint(
    checkpoint_dir: str, storage_options: Mapping[str, Any] | None = None
) -> CheckpointContents:
    """Name, shape, dtype and bytes of every entry, from the manifest or (legacy) DCP metadata.

    Raises:
        CheckpointNotFoundError: the directory holds no checkpoint parts.
    """
    storage = storage_for(checkpoint_dir, storage_options)
    manifest = read_manifest(storage, checkpoint_dir)
    if manifest is not None:
        from reckpt.dynamic.dump import table_entries

        parts = dict(manifest.entries)
        dynamic = table_entries(manifest.files)
        if dynamic:
            parts["dynamicemb"] = dynamic  # one entry per dynamic table (raw files, not DCP)
        return CheckpointContents(checkpoint_dir, parts)
    parts = {}
    for name in storage.ls(checkpoint_dir):
        if storage.exists(Storage.join(checkpoint_dir, name, DCP_METADATA_FILE)):
            parts[name] = entries_from_metadata(
                read_dcp_metadata(storage, Storage.join(checkpoint_dir, name))
            )
    if not parts:
        raise CheckpointNotFoundError(f"{checkpoint_dir}: no checkpoint parts (no */.metadata)")
    return CheckpointContents(checkpoint_dir, parts)


def read_part(
    checkpoint_dir: str,
    part: str = "model",
    keys: list[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    *,
    verify: bool = True,
) -> dict[str, Any]:
    """Load one part of a checkpoint into plain, unsharded values in this process.

    Runs without a process group and whatever the world size that saved it: every tensor
    comes back whole (flattened keys, as in the checkpoint). Reads safely (allow-listed
    metadata, ``weights_only`` items).

    Args:
        keys: only these entries (default: all).
        verify: first check the sizes and checksums of the part's files against the
            manifest (a legacy checkpoint has none to check); ``False`` reads whatever is
            there (salvage, or a caller that verified the checkpoint already).

    Raises:
        IntegrityError: ``verify`` and a file of the part is missing, truncated or corrupted.
    """
    storage = storage_for(checkpoint_dir, storage_options)
    return part_values(storage, checkpoint_dir, part, keys, verify=verify)


def part_values(
    storage: Storage,
    checkpoint_dir: str,
    part: str = "model",
    keys: list[str] | None = None,
    *,
    verify: bool = True,
) -> dict[str, Any]:
    """:func:`read_part` on an open storage (this process only; no process group)."""
    import torch
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from reckpt.dcp.load import load_part
    from reckpt.dcp.planner import PartialLoadPlanner

    dcp_dir = Storage.join(checkpoint_dir, part)
    if verify:
        _check_part(storage, checkpoint_dir, part)
    md = read_dcp_metadata(storage, dcp_dir)
    wanted = set(keys) if keys is not None else None
    state: dict[str, Any] = {}
    for name, item in md.state_dict_metadata.items():
        if wanted is not None and name not in wanted:
            continue
        if isinstance(item, BytesStorageMetadata):
            state[name] = None
        else:
            state[name] = torch.empty(tuple(item.size), dtype=item.properties.dtype)
    if wanted is not None and wanted - set(state):
        raise CheckpointNotFoundError(f"{dcp_dir}: no entries named {sorted(wanted - set(state))}")
    planner = PartialLoadPlanner(flatten_state_dict=False, source=dcp_dir)
    load_part(state, storage, dcp_dir, planner, metadata=md, what=f"reading {dcp_dir}")
    return state


def _check_part(storage: Storage, checkpoint_dir: str, part: str) -> None:
    from reckpt.format.verification import check_files, integrity_error

    manifest = read_manifest(storage, checkpoint_dir)
    if manifest is None:
        return
    files = sorted(f for f in manifest.files if f.startswith(f"{part}/"))
    problems = check_files(storage, checkpoint_dir, manifest, files)
    if problems:
        raise integrity_error(
            checkpoint_dir,
            problems,
            "Refusing to read values from a damaged checkpoint: use another one, or pass"
            " verify=False (--no-verify) to salvage what is readable.",
        )
