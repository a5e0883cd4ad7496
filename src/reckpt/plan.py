"""The ``plan`` file: a TorchRec sharding plan as TorchEasyRec's JSON (compat schema).

``{module_path: {table: {"sharding_type": str, "compute_kernel": str, "ranks": [int] | null}}}``
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from reckpt.errors import ConfigError
from reckpt.manifest import read_json_object
from reckpt.naming import PLAN_FILE
from reckpt.storage import Storage, storage_for

__all__ = ["plan_to_json", "model_plan", "read_plan"]


def _field(ps: Any, name: str) -> Any:
    return ps[name] if isinstance(ps, Mapping) else getattr(ps, name)


def plan_to_json(plan: Any) -> dict[str, dict[str, dict[str, Any]]]:
    """Convert a ``ShardingPlan`` (or its ``.plan`` mapping, or the JSON form) to the JSON form.

    Raises:
        ConfigError: ``plan`` has neither the ShardingPlan nor the JSON shape.
    """
    mapping = getattr(plan, "plan", plan)
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"plan must be a torchrec ShardingPlan or a mapping, got {type(plan).__name__}")
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for module_path, tables in mapping.items():
        try:
            out[str(module_path)] = {
                str(t): {
                    "sharding_type": str(_field(ps, "sharding_type")),
                    "compute_kernel": str(_field(ps, "compute_kernel")),
                    "ranks": None if _field(ps, "ranks") is None else [int(r) for r in _field(ps, "ranks")],
                }
                for t, ps in tables.items()
            }
        except (KeyError, AttributeError, TypeError) as e:
            raise ConfigError(
                f"plan entry for module {module_path!r} is not a parameter sharding: {e}"
            ) from e
    return out


def model_plan(model: Any) -> Any:
    """The sharding plan a (DistributedModelParallel) model carries, or ``None``."""
    plan = getattr(model, "_plan", None)
    return plan if plan is not None and hasattr(plan, "plan") else None


def read_plan(checkpoint_dir: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The checkpoint's plan (JSON form), ``None`` when it has none."""
    storage = storage_for(checkpoint_dir, storage_options)
    return read_json_object(storage, Storage.join(checkpoint_dir, PLAN_FILE))
