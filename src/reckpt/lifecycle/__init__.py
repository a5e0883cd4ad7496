"""The run around the checkpoints: manager, discovery, retention, resume, preemption, leases.

Example:
    >>> from reckpt.lifecycle import PinnedSteps
    >>> PinnedSteps(frozenset({100})).steps
    frozenset({100})
"""

from __future__ import annotations

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
