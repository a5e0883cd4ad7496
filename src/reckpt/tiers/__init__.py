"""Checkpoint tiers: shared memory, local disk, a durable store, and the persister between them.

A :class:`~reckpt.CheckpointManager` given ``tiers=`` saves into the fastest tier due at each
step and hands the copies to the slower tiers to a persister process on each node
(:mod:`reckpt.tiers.persister`); a restart resumes from the fastest tier that holds the newest
step every rank can load (:mod:`reckpt.tiers.select`). See ``docs/tiers.md``.

Example:
    >>> from reckpt.tiers import Tier, TierSet
    >>> tiers = TierSet([Tier("memory", "/dev/shm/run", 50, keep=1), Tier("durable", "s3://b/run", 500)])
    >>> tiers.trigger_steps
    50
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from reckpt._lazy import lazy_exports

_EXPORTS = {
    "Tier": "reckpt.tiers.config",
    "TierSet": "reckpt.tiers.config",
    "Copy": "reckpt.tiers.select",
    "Plan": "reckpt.tiers.select",
    "plan": "reckpt.tiers.select",
    "copy_checkpoint": "reckpt.tiers.promote",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from reckpt.tiers.config import Tier as Tier
    from reckpt.tiers.config import TierSet as TierSet
    from reckpt.tiers.promote import copy_checkpoint as copy_checkpoint
    from reckpt.tiers.select import Copy as Copy
    from reckpt.tiers.select import Plan as Plan
    from reckpt.tiers.select import plan as plan
