"""Reading checkpoints back: the restore engine, delta chains, part loading, inspection."""

from __future__ import annotations

from typing import TYPE_CHECKING

from reckpt._lazy import lazy_exports

_EXPORTS = {
    "restore_model": "reckpt.restore.engine",
    "inspect_checkpoint": "reckpt.restore.inspection",
    "CheckpointContents": "reckpt.restore.inspection",
    "list_distcp_param": "reckpt.restore.inspection",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from reckpt.restore.engine import restore_model as restore_model
    from reckpt.restore.inspection import CheckpointContents as CheckpointContents
    from reckpt.restore.inspection import inspect_checkpoint as inspect_checkpoint
    from reckpt.restore.inspection import list_distcp_param as list_distcp_param
