"""Sharding plans, fused optimizer state, managed collisions, and loads across layouts.

:func:`load_unsharded` reads a checkpoint saved on any number of ranks into one plain
process (serving); :func:`init_parameters` materialises a model built on the meta device;
:func:`plan_constraints` turns a saved plan into TorchRec planner constraints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from reckpt._lazy import lazy_exports

_EXPORTS = {
    "load_unsharded": "reckpt.sharding.unsharded",
    "init_parameters": "reckpt.sharding.meta_init",
    "plan_constraints": "reckpt.sharding.plan",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from reckpt.sharding.meta_init import init_parameters as init_parameters
    from reckpt.sharding.plan import plan_constraints as plan_constraints
    from reckpt.sharding.unsharded import load_unsharded as load_unsharded
