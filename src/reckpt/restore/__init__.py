"""Reading checkpoints back: the restore engine, delta chains, part loading, inspection."""

from __future__ import annotations

from reckpt._lazy import lazy_exports

_EXPORTS = {
    "restore_model": "reckpt.restore.engine",
    "inspect_checkpoint": "reckpt.restore.inspection",
    "CheckpointContents": "reckpt.restore.inspection",
    "list_distcp_param": "reckpt.restore.inspection",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
