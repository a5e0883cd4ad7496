"""The ``plan`` file: a TorchRec sharding plan as TorchEasyRec's JSON (compat schema).

``{module_path: {table: {"sharding_type": str, "compute_kernel": str, "ranks": [int] | null}}}``
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from reckpt.errors import ConfigError
from reckpt.format.manifest import read_json_object
from reckpt.naming import PLAN_FILE
from reckpt.storage.core import Storage, storage_for

__all__ = ["plan_to_json", "model_plan", "read_plan", "plan_constraints", "FORCE_LOAD_SHARDING_PLAN"]

FORCE_LOAD_SHARDING_PLAN = "FORCE_LOAD_SHARDING_PLAN"
"""TorchEasyRec's environment variable: ``1`` pins every table's saved sharding type."""


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


def plan_constraints(
    plan: Any,
    constraints: Mapping[str, Any] | None = None,
    *,
    pin_all: bool = False,
) -> dict[str, Any]:
    """Planner constraints that make a resumed run keep its checkpoint's plan (TorchEasyRec rules).

    Every table whose saved sharding type is ``data_parallel`` (every table with
    ``pin_all``) and that ``constraints`` does not already name gets a
    ``ParameterConstraints(sharding_types=[saved type])``; the user's constraints are kept as
    they are. Data-parallel tables are pinned by default because their optimizer state lives
    in the dense optimizer: moving them in or out of data-parallel changes the state's keys
    (``reckpt`` converts them, see ``docs/resharding.md``, but a stable plan needs none).
    Kernels and ranks are not pinned: the planner re-derives them.

    Args:
        plan: the checkpoint's plan (:func:`read_plan`), a ``ShardingPlan``, or ``None``.
        constraints: the user's ``table -> ParameterConstraints`` (kept, never overridden).
        pin_all: pin every table, not only data-parallel ones (TorchEasyRec's
            ``FORCE_LOAD_SHARDING_PLAN=1``).

    Returns:
        A new ``table name -> ParameterConstraints`` mapping for ``EmbeddingShardingPlanner``.

    Raises:
        ConfigError: ``plan`` has neither the ShardingPlan nor the JSON shape, or names one
            table with two different saved sharding types.

    Example:
        >>> c = plan_constraints({"ebc": {"t1": {"sharding_type": "data_parallel",
        ...     "compute_kernel": "dense", "ranks": [0, 1]}}})
        >>> c["t1"].sharding_types
        ['data_parallel']
    """
    from torchrec.distributed.planner import ParameterConstraints

    out: dict[str, Any] = dict(constraints or {})
    if plan is None:
        return out
    pinned: dict[str, tuple[str, str]] = {}
    for module_path, tables in plan_to_json(plan).items():
        for table, entry in tables.items():
            st = entry["sharding_type"]
            if table in (constraints or {}) or not (pin_all or st == "data_parallel"):
                continue
            if table in pinned and pinned[table][0] != st:
                first_type, first_module = pinned[table]
                raise ConfigError(
                    f"plan: table {table!r} is {first_type!r} in module {first_module!r} and {st!r} in"
                    f" {module_path!r}; planner constraints are per table name: pass a constraint for"
                    f" {table!r} yourself (it is then not pinned)"
                )
            pinned[table] = (st, module_path)
            out[table] = ParameterConstraints(sharding_types=[st])
    return out
