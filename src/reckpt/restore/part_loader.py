"""One restore's shared context: storage, ranks, renames, the report, and its load jobs.

:class:`PartLoader` checks every :class:`LoadJob` on every rank before any is loaded, then
loads each with :func:`~reckpt.dcp.load.load_part`; with a
:class:`~reckpt.format.read_verify.ReadVerifier` the data files are checked as they are read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata

from reckpt.dcp.load import load_part
from reckpt.dcp.planner import PartialLoadPlanner, saved_shapes
from reckpt.dcp.reader import read_dcp_metadata
from reckpt.dist import Dist
from reckpt.errors import KeyMismatchError
from reckpt.format.read_verify import ReadVerifier
from reckpt.format.verification import check_storage_bounds
from reckpt.naming import DCP_METADATA_FILE, MODEL_DIR, OPTIMIZER_DIR
from reckpt.remap import SKIP, RenameRule, ec_list_to_ec_dict_rule
from reckpt.report import LoadReport, PartReport
from reckpt.restore.key_checks import check_matched, check_param_map, resolved_keys
from reckpt.sharding.fused_fill import read_sources
from reckpt.sharding.mch import MchPlan
from reckpt.storage.core import Storage

__all__ = ["LoadJob", "PartLoader"]

logger = logging.getLogger(__name__)

_OPTIMIZER_KEYS = ("state.", "param_groups.")  # the optimizer part's key layout


@dataclass
class LoadJob:
    """One part to restore: where it lives, what to fill, what to do afterwards."""

    part: str
    target: Callable[[], dict[str, Any]]
    finish: Callable[[dict[str, Any], PartReport], None] = lambda sd, pr: None
    report_as: str | None = None
    extra_rules: Sequence[RenameRule] = ()
    exclude_keys: Sequence[str] = ()
    strict_shapes: bool = False
    allow_row_resize: bool = False
    reinit_on_mismatch: bool = False
    error_on_missing_keys: bool = False
    warn_on_missing_keys: bool = True


class PartLoader:
    """Shared context of one restore: storage, ranks, renames, the report.

    Every job is first checked on every rank (keys resolved against the checkpoint's
    metadata; errors gathered and raised on all ranks), and only then are the jobs loaded,
    so a user mistake in any part stops the restore before anything is overwritten.
    """

    def __init__(
        self,
        storage: Storage,
        ckpt: str,
        d: Dist,
        param_map: dict[str, str],
        rules: Sequence[RenameRule],
        report: LoadReport,
        lenient_param_map: bool = False,
    ) -> None:
        self.storage, self.ckpt, self.d = storage, ckpt, d
        self.param_map, self.rules, self.report = param_map, list(rules), report
        self.lenient_param_map = lenient_param_map
        self.mch: MchPlan | None = None
        self.verifier: ReadVerifier | None = None
        self._metadata: dict[str, Metadata] = {}

    def reader(self, part: str) -> Callable[[dict[str, Any]], dict[str, torch.Tensor]]:
        """Collective reader of whole saved tensors of ``part`` (see ``fused_state.read_sources``)."""
        md, dcp_dir = self.metadata(part), Storage.join(self.ckpt, part)
        return lambda wanted: read_sources(wanted, self.storage, dcp_dir, md, self.d)

    def has(self, part: str) -> bool:
        return self.storage.exists(Storage.join(self.ckpt, part, DCP_METADATA_FILE))

    def metadata(self, part: str) -> Metadata:
        if part not in self._metadata:
            md = read_dcp_metadata(self.storage, Storage.join(self.ckpt, part))
            check_storage_bounds(self.storage, Storage.join(self.ckpt, part), md)
            self._metadata[part] = md
        return self._metadata[part]

    def _planner(self, job: LoadJob, state_dict: dict[str, Any]) -> PartialLoadPlanner:
        md = self.metadata(job.part)
        planner = PartialLoadPlanner(
            warn_on_missing_keys=job.warn_on_missing_keys,
            param_map=self.param_map,
            rename_rules=[*self.rules, *job.extra_rules, ec_list_to_ec_dict_rule(saved_shapes(md))],
            exclude_keys=job.exclude_keys,
            strict_shapes=job.strict_shapes,
            allow_row_resize=job.allow_row_resize,
            reinit_on_mismatch=job.reinit_on_mismatch,
            source=Storage.join(self.ckpt, job.part),
        )
        planner.set_up_planner(state_dict, md, self.d.is_coordinator)
        return planner

    def check(self, jobs: Sequence[LoadJob]) -> None:
        """Collective: resolve every job's keys on every rank; all ranks raise on any error.

        Besides each job's own checks: every parameter-map line must name a key of the
        current state and one of the checkpoint, and the model part must match at least one
        key (:mod:`reckpt.restore.key_checks`). Those use the keys of every rank: a rank that holds
        no shard of a table may not list it.
        """
        err: BaseException | None = None
        current: set[str] = set()
        saved: set[str] = set()
        model_keys: set[str] = set()
        model_loads: set[str] = set()
        try:
            for job in jobs:
                res = self._planner(job, job.target()).resolve()
                current |= resolved_keys(res)
                saved |= set(saved_shapes(self.metadata(job.part)))
                if job.part == MODEL_DIR and job.report_as is None:
                    # keys mapped to "-" are deliberately not loaded: they do not count
                    model_keys = {k for k in resolved_keys(res) if self.param_map.get(k) != SKIP}
                    model_loads = set(res.loads)
                if job.error_on_missing_keys and res.missing:
                    raise KeyMismatchError(
                        f"{Storage.join(self.ckpt, job.part)}: {len(res.missing)} key(s) of the current"
                        f" {job.part} are missing from the checkpoint: "
                        + ", ".join(sorted(res.missing))
                        + ". Map them with a parameter-map file, or restore with"
                        " error_on_missing_keys=False to keep their initial values."
                    )
        except Exception as e:
            err = e
        self.d.raise_if_any(err, f"resolving keys of {self.ckpt}")
        if not jobs:
            return
        gathered = self.d.all_gather((sorted(current), sorted(model_keys), sorted(model_loads)))
        try:
            everyone = set().union(*(set(c) for c, _, _ in gathered))
            lines = self.param_map
            if OPTIMIZER_DIR not in {job.part for job in jobs}:  # optimizer lines do not apply
                lines = {k: v for k, v in lines.items() if not k.startswith(_OPTIMIZER_KEYS)}
            check_param_map(lines, everyone, saved, self.ckpt, lenient=self.lenient_param_map)
            if any(keys for _, keys, _ in gathered):
                check_matched(
                    set().union(*(set(k) for _, k, _ in gathered)),
                    set().union(*(set(lo) for _, _, lo in gathered)),
                    saved_shapes(self.metadata(MODEL_DIR)),
                    Storage.join(self.ckpt, MODEL_DIR),
                )
        except Exception as e:
            err = e
        self.d.raise_if_any(err, f"checking the keys of {self.ckpt}")

    def load(self, job: LoadJob) -> None:
        """Collective: DCP-load one (checked) job and record its report."""
        state_dict = job.target()
        planner = self._planner(job, state_dict)
        dcp_dir = Storage.join(self.ckpt, job.part)
        load_part(
            state_dict,
            self.storage,
            dcp_dir,
            planner,
            metadata=self.metadata(job.part),
            dist=self.d,
            verifier=self.verifier,
            part=job.part,
        )
        pr = planner.resolution
        pr.missing.sort()
        pr.resized.sort()
        pr.reinitialized.sort()
        job.finish(state_dict, pr)
        self.report.parts[job.report_as or job.part] = pr
        for key in pr.reinitialized:
            logger.warning("%s: [%s] does not fit the checkpoint; keeping its initial value", dcp_dir, key)

    def skip(self, part: str, why: str, warn: bool = True) -> None:
        self.report.part(part).skipped = why
        if warn:
            logger.warning("%s: %s", self.ckpt, why)
            self.report.notes.append(f"{part}: {why}")
