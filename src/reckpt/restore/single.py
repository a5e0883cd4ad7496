"""The restore engine: one checkpoint's files into the model, optimizer, EMA and extra states.

:func:`restore_one` is a short sequence of phases, each a function of this module:

1. *resolve* (done by the caller: :func:`reckpt.restore.target.resolve_target`), then
   :func:`plan_jobs`: which parts load into which object, which are skipped and why;
2. *check*: :func:`check_files` (sizes and checksums: all now with ``verify="first"``, else
   the data files while they are read) and :func:`check_keys` (every job's keys on every
   rank), so a mistake stops the restore before anything is overwritten;
3. *read*: :func:`read_dynamic_tables` (read and checked, not applied), then
   :func:`read_parts` (each part loaded through DCP into its object);
4. *apply*: :func:`apply_rest` (the verdict on the data files read, the EMA restart, the
   dynamic tables filled);
5. *report*: the :class:`~reckpt.report.LoadReport`, logged and returned.

:func:`reckpt.restore_model` calls it for a full checkpoint; :mod:`reckpt.restore.chain`
calls it for a delta chain's base and for the delta's own files. All phases are collective:
every rank runs each, in the same order.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from reckpt.dynamic.load import RestoreStep, restore_step
from reckpt.errors import CheckpointNotFoundError
from reckpt.format.manifest import read_json_object
from reckpt.format.read_verify import ReadVerifier
from reckpt.format.verification import verify_collective
from reckpt.naming import DENSE_EMA_DIR, META_FILE, MODEL_DIR, OPTIMIZER_DIR, validate_extra_name
from reckpt.remap import RenameRule, input_tile_rule, parse_param_map
from reckpt.report import LoadReport
from reckpt.restore.jobs import OptimizerJob, managed_collision, state_applier
from reckpt.restore.part_loader import LoadJob, PartLoader
from reckpt.restore.target import RestoreOptions, Target
from reckpt.storage.core import Storage, storage_for

__all__ = [
    "restore_one",
    "read_meta",
    "plan_jobs",
    "check_files",
    "check_keys",
    "read_dynamic_tables",
    "read_parts",
    "apply_rest",
]

logger = logging.getLogger(__name__)


def read_meta(storage: Storage, checkpoint_dir: str) -> dict[str, Any]:
    """The checkpoint's ``meta`` flags (``{}`` when absent)."""
    return read_json_object(storage, Storage.join(checkpoint_dir, META_FILE)) or {}


def restore_one(target: Target, model: torch.nn.Module, optimizer: Any, opts: RestoreOptions) -> LoadReport:
    """Collective: restore one checkpoint's own files (no chain), phase by phase.

    Every rank calls it with the same ``target`` and ``opts``. See the module docstring for
    the phases; the arguments mean what they mean for :func:`reckpt.restore_model`.
    """
    report = LoadReport(target.path, legacy=target.state == "legacy")
    verifier = check_files(target, opts.verify, report)  # check: files ("first": all, now)
    meta = read_meta(target.storage, target.path)
    ld = PartLoader(
        target.storage, target.path, target.d, _names(opts), _rules(opts), report, opts.lenient_param_map
    )
    jobs = plan_jobs(ld, meta, model, optimizer, opts)  # resolve: which part goes where
    check_keys(ld, model, jobs, verifier)  # check: keys and shapes, on every rank
    dynamic = read_dynamic_tables(target, model, meta, optimizer, opts)  # read: dynamic tables
    read_parts(ld, jobs, verifier, opts.dense_ema)  # read: the DCP parts, into their objects
    apply_rest(ld, verifier, dynamic, opts.dense_ema)  # apply: verdict, EMA, dynamic tables
    logger.info("%s", report.summary())  # report
    return report


def _names(opts: RestoreOptions) -> dict[str, str]:
    """``current -> checkpoint`` renames: the parameter-map file's, then ``param_map`` over them."""
    names: dict[str, str] = {}
    path = opts.ckpt_param_map_path
    if path is not None:
        map_storage = storage_for(path, opts.storage_options)  # a file of its own, anywhere
        if not map_storage.isfile(path):
            raise CheckpointNotFoundError(f"ckpt_param_map_path {path}: file does not exist")
        names.update(parse_param_map(map_storage.read_text(path), path))
    names.update(opts.param_map or {})
    return names


def _rules(opts: RestoreOptions) -> list[RenameRule]:
    rules = list(opts.rename_rules)
    if os.environ.get("INPUT_TILE", "").startswith("3"):
        rules.append(input_tile_rule)
    return rules


def check_files(target: Target, verify: bool | str, report: LoadReport) -> ReadVerifier | None:
    """Check phase, files: ``"first"`` checks every file now (collective); ``True`` returns the
    verifier that checks them while they are read; ``False`` (or a legacy checkpoint) nothing."""
    if target.manifest is None or not verify:
        return None
    if verify == "first":
        verify_collective(target.storage, target.path, target.manifest, target.d)
        report.verified = True
        return None
    return ReadVerifier(target.storage, target.path, target.manifest, target.d)


def plan_jobs(
    ld: PartLoader, meta: dict[str, Any], model: torch.nn.Module, optimizer: Any, opts: RestoreOptions
) -> list[LoadJob]:
    """Resolve phase, parts: one job per part to load; the others are recorded as skipped.

    Raises:
        CheckpointNotFoundError: the model is to be loaded and the checkpoint has no ``model/``.
    """
    jobs: list[LoadJob] = []
    if meta.get("load_model", True) is False:
        ld.skip(MODEL_DIR, "meta.load_model is false", warn=False)
    elif not ld.has(MODEL_DIR):
        raise CheckpointNotFoundError(f"model_ckpt_path[{Storage.join(ld.ckpt, MODEL_DIR)}] not exists")
    else:
        jobs.append(
            LoadJob(
                MODEL_DIR,
                model.state_dict,
                state_applier(model, MODEL_DIR, ld.report),
                strict_shapes=opts.strict_shapes,
                allow_row_resize=opts.allow_row_resize,
                error_on_missing_keys=opts.error_on_missing_keys,
            )
        )
    if optimizer is not None:
        if not opts.load_optimizer:
            ld.skip(OPTIMIZER_DIR, "load_optimizer=False", warn=False)
        elif meta.get("load_optim", True) is False:
            ld.skip(OPTIMIZER_DIR, "meta.load_optim is false", warn=False)
        elif not ld.has(OPTIMIZER_DIR):
            ld.skip(OPTIMIZER_DIR, "the checkpoint has no optimizer/; optimizer state starts fresh")
        else:
            jobs.append(OptimizerJob(ld, model, optimizer, strict_shapes=opts.strict_shapes).job)
    return jobs + _ema_jobs(ld, model, opts) + _extra_jobs(ld, opts)


def _ema_jobs(ld: PartLoader, model: torch.nn.Module, opts: RestoreOptions) -> list[LoadJob]:
    """``dense_ema/`` into the EMA object, and (``use_dense_ema``) over the model's parameters."""
    jobs: list[LoadJob] = []
    if opts.dense_ema is not None:
        if ld.has(DENSE_EMA_DIR):
            jobs.append(
                LoadJob(
                    DENSE_EMA_DIR,
                    opts.dense_ema.state_dict,
                    state_applier(opts.dense_ema, DENSE_EMA_DIR, ld.report),
                    strict_shapes=opts.strict_shapes,
                    warn_on_missing_keys=False,
                )
            )
        else:
            ld.skip(DENSE_EMA_DIR, "the checkpoint has no dense_ema/; EMA will restart")
    if opts.use_dense_ema:
        if ld.has(DENSE_EMA_DIR):
            jobs.append(
                LoadJob(
                    DENSE_EMA_DIR,
                    lambda: dict(model.named_parameters()),
                    report_as="dense_ema_overlay",
                    strict_shapes=opts.strict_shapes,
                    warn_on_missing_keys=False,
                )
            )
        else:
            ld.skip(
                "dense_ema_overlay", "use_dense_ema: the checkpoint has no dense_ema/; keeping raw parameters"
            )
    return jobs


def _extra_jobs(ld: PartLoader, opts: RestoreOptions) -> list[LoadJob]:
    jobs: list[LoadJob] = []
    for name, obj in (opts.extra_states or {}).items():
        validate_extra_name(name)
        if not ld.has(name):
            ld.skip(name, f"the checkpoint has no {name}/; {name} keeps its current state")
            continue
        jobs.append(
            LoadJob(
                name, obj.state_dict, state_applier(obj, name, ld.report), strict_shapes=opts.strict_shapes
            )
        )
    return jobs


def check_keys(
    ld: PartLoader, model: torch.nn.Module, jobs: list[LoadJob], verifier: ReadVerifier | None
) -> None:
    """Check phase, keys (collective): every file but the data files to be read, then every
    job's keys on every rank; managed-collision state is fitted to this world size first."""
    if verifier is not None:
        verifier.before_load(job.part for job in jobs)
        ld.verifier = verifier
    managed_collision(ld, model, jobs)
    ld.check(jobs)


def read_dynamic_tables(
    target: Target, model: torch.nn.Module, meta: dict[str, Any], optimizer: Any, opts: RestoreOptions
) -> RestoreStep | None:
    """Read phase, ``dynamicemb/`` (collective): every table read and checked, not yet applied."""
    return restore_step(
        target.storage,
        target.path,
        model,
        meta,
        optimizer_restored=optimizer is not None and opts.load_optimizer,
        upsert=target.is_delta,  # a delta holds touched rows only
        process_group=target.d.group,
    )


def read_parts(ld: PartLoader, jobs: list[LoadJob], verifier: ReadVerifier | None, dense_ema: Any) -> None:
    """Read phase, DCP parts (collective): each job loaded into its object, in order.

    Raises:
        IntegrityError: a load failed and a data file it read is damaged (the real cause).
    """
    reset = getattr(dense_ema, "reset", None)
    try:
        for job in jobs:
            if job.part == DENSE_EMA_DIR and job.report_as is None and callable(reset):
                # TorchEasyRec order: the EMA restarts from the just-restored weights, then loads.
                reset()
            ld.load(job)
    except Exception as e:
        if verifier is not None:
            verifier.explain(e)  # a damaged file is the real cause: say so
        raise


def apply_rest(
    ld: PartLoader, verifier: ReadVerifier | None, dynamic: RestoreStep | None, dense_ema: Any
) -> None:
    """Apply phase (collective): the data files' verdict (all ranks raise on a damaged one),
    the EMA restart when the checkpoint has none, the dynamic tables filled."""
    if verifier is not None:
        verifier.after_load()
        ld.report.verified = True
    if dense_ema is not None and not ld.has(DENSE_EMA_DIR) and callable(getattr(dense_ema, "reset", None)):
        dense_ema.reset()
    if dynamic is not None:
        dynamic.apply(ld.report)
