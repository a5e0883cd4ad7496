"""The load jobs of :func:`reckpt.restore_model`: how each loaded part is put into its object.

* :func:`state_applier`: an object with ``load_state_dict`` gets the loaded state dict; one
  without it (TorchEasyRec's ``DenseEMA``) is filled in place: DCP already wrote into the
  tensors its ``state_dict()`` returned, other tensors are copied in (``copy_``), and
  non-tensor values it cannot take are skipped and reported (``PartReport.not_applied``).
* :class:`OptimizerJob`: initialise optimizer state without data, load, convert
  plan-dependent state, apply, drop state invented for unknown parameters.
* :func:`managed_collision`: fit managed-collision state to this world size.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from reckpt.naming import MODEL_DIR, OPTIMIZER_DIR
from reckpt.optim import (
    init_optimizer_state,
    is_index_keyed,
    is_keyed_optimizer,
    load_optimizer_state_dict,
    optimizer_param_names,
    optimizer_state_dict,
)
from reckpt.remap import RenameRule, index_keyed_optimizer_rule
from reckpt.report import LoadReport, PartReport
from reckpt.restore.part_loader import LoadJob, PartLoader
from reckpt.sharding.fused_fill import fill_conversions
from reckpt.sharding.fused_state import RowwiseConversion, dense_fused_rename_rule, plan_conversions
from reckpt.sharding.mch import has_managed_collision, plan_mch
from reckpt.sharding.unsharded import read_rows
from reckpt.storage.core import Storage

__all__ = ["OptimizerJob", "managed_collision", "state_applier"]

logger = logging.getLogger(__name__)

_GROUP_PARAMS = re.compile(r"param_groups\.[0-9]+\.params")


def _flat(sd: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in sd.items():
        if isinstance(v, Mapping):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # e.g. objects whose == is elementwise or raises: not provably equal
        return a is b


def state_applier(obj: Any, part: str, report: LoadReport) -> Callable[[dict[str, Any], PartReport], None]:
    """``finish`` callback putting a loaded state dict into ``obj``.

    With ``obj.load_state_dict`` the loaded dict is handed to it. Without one (TorchEasyRec's
    ``DenseEMA`` has only ``state_dict()``), the object's own ``state_dict()`` tensors are
    filled in place: DCP loaded into the very tensors the dict held, and any the object
    returns afresh get a ``copy_``. A non-tensor value the checkpoint changed cannot be put
    back this way: it is listed in ``not_applied``, logged and noted in the report.
    """
    load = getattr(obj, "load_state_dict", None)
    if callable(load):
        return lambda sd, pr: load(sd)

    def apply(sd: dict[str, Any], pr: PartReport) -> None:
        live = dict(_flat(obj.state_dict()))
        loaded = set(pr.loaded)
        with torch.no_grad():
            for key, value in _flat(sd):
                dst = live.get(key)
                if isinstance(value, torch.Tensor) and isinstance(dst, torch.Tensor):
                    if dst is not value:
                        dst.copy_(value)
                elif key in loaded and not (key in live and _same(dst, value)):
                    pr.not_applied.append(key)
        if pr.not_applied:
            why = (
                f"{type(obj).__name__} has no load_state_dict(): tensors were filled in place, but"
                f" {len(pr.not_applied)} non-tensor value(s) could not be set and keep the object's"
                f" own: {', '.join(pr.not_applied)}"
            )
            logger.warning("%s: %s", part, why)
            report.notes.append(f"{part}: {why}")

    return apply


class OptimizerJob:
    """The optimizer's restore: initialise state once (no data), load, apply, tidy up."""

    def __init__(
        self, ld: PartLoader, model: torch.nn.Module, optimizer: Any, *, strict_shapes: bool = False
    ) -> None:
        self.model, self.optimizer = model, optimizer
        self.strict_shapes = strict_shapes
        self.keyed = is_keyed_optimizer(optimizer)
        self.created: list[Any] | None = None
        rules: list[RenameRule] = []
        if not self.keyed and is_index_keyed(ld.metadata(OPTIMIZER_DIR).state_dict_metadata):
            names = optimizer_param_names(model, optimizer)
            rules.append(index_keyed_optimizer_rule({n: i for i, n in enumerate(names)}))
        if self.keyed:
            rules.append(dense_fused_rename_rule)
        groups = len(optimizer.param_groups)
        self.ld = ld
        self.conversions: dict[str, RowwiseConversion] | None = None
        self.job = LoadJob(
            OPTIMIZER_DIR,
            self.target,
            self.finish,
            extra_rules=rules,
            exclude_keys=[f"param_groups.{i}.params" for i in range(groups)],
            strict_shapes=strict_shapes,
            reinit_on_mismatch=True,
        )

    def target(self) -> dict[str, Any]:
        if self.created is None:
            self.created = init_optimizer_state(self.optimizer)
        sd = optimizer_state_dict(self.model, self.optimizer, "name")
        if self.conversions is None:
            # Row-wise state laid out for another plan is converted after the load, not by DCP
            # (which would load it positionally); decided once, before the keys are checked.
            model_md = self.ld.metadata(MODEL_DIR) if self.ld.has(MODEL_DIR) else None
            optim_md = self.ld.metadata(OPTIMIZER_DIR)
            self.conversions = plan_conversions(
                sd,
                self.model.state_dict(),
                optim_md,
                model_md,
                skip=self.ld.param_map,
                overlap=not self.strict_shapes,
            )
            self.job.exclude_keys = [*self.job.exclude_keys, *self.conversions]
        return sd

    def finish(self, sd: dict[str, Any], pr: PartReport) -> None:
        # Saved parameter lists are replaced by the current ones on purpose: not "unused".
        pr.unused = [k for k in pr.unused if not _GROUP_PARAMS.fullmatch(k)]
        self._convert(sd, pr)
        self._move_mch_rows(sd)
        load_optimizer_state_dict(self.model, self.optimizer, sd)
        if self.keyed or not self.created:
            return
        # State that init_optimizer_state created for parameters the checkpoint does not know
        # is dropped, so their first real step initialises it exactly as in a fresh run.
        missing = set(pr.missing)
        created_ids = {id(p) for p in self.created}
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for name, p in zip(optimizer_param_names(self.model, self.optimizer), params, strict=True):
            keys = [f"state.{name}.{k}" for k in self.optimizer.state.get(p, {})]
            if id(p) in created_ids and keys and all(k in missing for k in keys):
                self.optimizer.state.pop(p, None)
                pr.reinitialized.append(f"state.{name}")

    def _move_mch_rows(self, sd: dict[str, Any]) -> None:
        """Collective: optimizer rows of redistributed managed-collision tables follow their ids."""
        if self.ld.mch is not None and self.ld.mch.moves:
            md = self.ld.metadata(OPTIMIZER_DIR).state_dict_metadata
            self.ld.mch.move_optimizer_rows(sd, md, self.ld.reader(OPTIMIZER_DIR))

    def _convert(self, sd: dict[str, Any], pr: PartReport) -> None:
        """Collective: fill the plan-dependent keys (see :mod:`reckpt.sharding.fused_state`)."""
        conversions = self.conversions or {}
        if any(self.ld.d.all_gather(bool(conversions))):
            md = self.ld.metadata(OPTIMIZER_DIR).state_dict_metadata
            where = Storage.join(self.ld.ckpt, OPTIMIZER_DIR)
            read = self.ld.reader(OPTIMIZER_DIR)
            fill_conversions(conversions, sd, pr, md, read, self.ld.report.notes, where)


def managed_collision(ld: PartLoader, model: torch.nn.Module, jobs: list[LoadJob]) -> None:
    """Collective: fit managed-collision state to this world size (see :mod:`reckpt.sharding.mch`)."""
    job = next((j for j in jobs if j.part == MODEL_DIR), None)
    if job is None or not has_managed_collision(model):
        return
    md = ld.metadata(MODEL_DIR)
    dcp_dir = Storage.join(ld.ckpt, MODEL_DIR)

    def rows(key: str, which: torch.Tensor) -> torch.Tensor | None:
        return read_rows(ld.storage, dcp_dir, md, key, which)

    plan = plan_mch(model, model.state_dict(), md, ld.reader(MODEL_DIR), rows, ld.d.rank, ld.d.world_size)
    if not plan.moves:
        return
    ld.mch = plan
    job.exclude_keys = [*job.exclude_keys, *plan.exclude]

    def finish(sd: dict[str, Any], pr: PartReport) -> None:
        plan.apply_model(sd)
        model.load_state_dict(sd)

    job.finish = finish
    ld.report.notes.extend(plan.notes)
