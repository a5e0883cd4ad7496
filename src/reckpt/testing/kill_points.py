"""Which phase of the commit protocol a traced storage operation belongs to.

The kill harness (``benchmarks/kill_harness.py``) traces every storage operation of a save
(``RECKPT_FAULT_TRACE``, see :mod:`reckpt.storage.hooks`), kills the writer before one of
them, and reports the outcome per phase. The names come from :mod:`reckpt.naming`, so a
renamed marker cannot silently move operations into ``other``.
"""

from __future__ import annotations

from reckpt.naming import (
    CKPT_PREFIX,
    DCP_METADATA_FILE,
    DELETING_MARKER,
    IN_PROGRESS_MARKER,
    MANIFEST_FILE,
    OWNER_FILE,
    REPLACE_RECORD,
    SIDECAR_SUFFIX,
    is_staging,
    is_trash,
)

__all__ = ["PHASES", "op_phase"]

PHASES = ("data", "fsync", "manifest", "commit", "prune", "sidecar", "other")


def op_phase(kind: str, path: str) -> str:
    """The commit-protocol phase of a storage operation (one of :data:`PHASES`; pure).

    Examples:
        >>> op_phase("write", "run/.reckpt-staging.ab/model/__0_0.distcp")
        'data'
        >>> op_phase("write", "run/.reckpt-staging.ab/reckpt.json")
        'manifest'
        >>> op_phase("rename", "run/.reckpt-staging.ab -> run/model.ckpt-5")
        'commit'
        >>> op_phase("rename", "run/model.ckpt-1 -> run/.reckpt-trash.cd")
        'prune'
    """
    last = path.rsplit(" -> ", 1)[-1]
    parts = last.rstrip("/").split("/")
    name = parts[-1]
    if SIDECAR_SUFFIX in name:
        return "sidecar"
    if any(is_trash(p) for p in parts) or name == DELETING_MARKER:
        return "prune"
    if kind == "fsync":
        return "fsync"
    if name == MANIFEST_FILE:
        return "prune" if kind == "delete" else "manifest"
    if name == DCP_METADATA_FILE:  # DCP renames its metadata into place while writing a part
        return "data"
    if kind == "rename" or name in (IN_PROGRESS_MARKER, OWNER_FILE, REPLACE_RECORD):
        return "commit"
    if CKPT_PREFIX in last and kind == "delete":
        return "prune"
    if kind == "write" and (any(is_staging(p) for p in parts) or CKPT_PREFIX in last):
        return "data"
    return "other"
