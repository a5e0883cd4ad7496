"""The run around the checkpoints: manager, discovery, retention, resume, preemption, leases.

Example:
    >>> from reckpt.lifecycle import PinnedSteps
    >>> PinnedSteps(frozenset({100})).steps
    frozenset({100})
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from reckpt._lazy import lazy_exports

_EXPORTS = {
    "CheckpointManager": "reckpt.lifecycle.manager",
    "Preemption": "reckpt.lifecycle.preemption",
    "ResumeInfo": "reckpt.lifecycle.resume",
    "list_checkpoints": "reckpt.lifecycle.discovery",
    "latest_checkpoint": "reckpt.lifecycle.discovery",
    "best_checkpoint": "reckpt.lifecycle.discovery",
    "lease": "reckpt.commit.leases",
    "EveryNSeconds": "reckpt.policy",
    "PinnedSteps": "reckpt.policy",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from reckpt.commit.leases import lease as lease
    from reckpt.lifecycle.discovery import best_checkpoint as best_checkpoint
    from reckpt.lifecycle.discovery import latest_checkpoint as latest_checkpoint
    from reckpt.lifecycle.discovery import list_checkpoints as list_checkpoints
    from reckpt.lifecycle.manager import CheckpointManager as CheckpointManager
    from reckpt.lifecycle.preemption import Preemption as Preemption
    from reckpt.lifecycle.resume import ResumeInfo as ResumeInfo
    from reckpt.policy import EveryNSeconds as EveryNSeconds
    from reckpt.policy import PinnedSteps as PinnedSteps
