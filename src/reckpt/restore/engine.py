"""``restore_model``: load a checkpoint into a (possibly changed) model, part by part."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from reckpt.dist import Dist
from reckpt.errors import CheckpointNotFoundError, ConfigError
from reckpt.format.manifest import read_json_object, read_manifest
from reckpt.format.read_verify import ReadVerifier
from reckpt.format.verification import require_committed, verify_collective
from reckpt.naming import (
    DENSE_EMA_DIR,
    META_FILE,
    MODEL_DIR,
    OPTIMIZER_DIR,
    validate_extra_name,
)
from reckpt.remap import RenameRule, input_tile_rule, parse_param_map
from reckpt.report import LoadReport
from reckpt.restore.jobs import OptimizerJob, managed_collision, state_applier
from reckpt.restore.part_loader import LoadJob, PartLoader
from reckpt.storage.core import Storage, storage_for

__all__ = ["restore_model", "read_meta"]

logger = logging.getLogger(__name__)


def read_meta(storage: Storage, checkpoint_dir: str) -> dict[str, Any]:
    """The checkpoint's ``meta`` flags (``{}`` when absent)."""
    return read_json_object(storage, Storage.join(checkpoint_dir, META_FILE)) or {}


def restore_model(
    checkpoint_dir: str,
    model: torch.nn.Module,
    optimizer: Any = None,
    ckpt_param_map_path: str | None = None,
    error_on_missing_keys: bool = False,
    dense_ema: Any = None,
    use_dense_ema: bool = False,
    *,
    extra_states: Mapping[str, Any] | None = None,
    load_optimizer: bool = True,
    verify: bool | str = True,
    strict_shapes: bool = False,
    allow_row_resize: bool = False,
    param_map: Mapping[str, str] | None = None,
    rename_rules: Sequence[RenameRule] = (),
    storage_options: Mapping[str, Any] | None = None,
    process_group: Any = None,
    follow_delta_chain: bool = True,
    allow_lossy: bool = False,
    lenient_param_map: bool = False,
) -> LoadReport:
    """Restore a checkpoint into ``model`` (and optimizer, EMA, extra state), partially if needed.

    Collective: every rank calls it. Each rank resolves its keys against the checkpoint's
    metadata (raising on every rank before anything is read when a shape does not fit or,
    with ``error_on_missing_keys``, a key is missing), checks a share of the small files, then
    loads its shards, hashing each data file as it reads it (one read per byte; see
    :mod:`reckpt.format.read_verify`); DCP reshards across world-size changes.

    Args:
        checkpoint_dir: a committed checkpoint (``<model_dir>/model.ckpt-<step>``).
        model: the model to fill; keys the checkpoint lacks keep their values (reported).
        optimizer: optional; its state is initialised without data, then loaded.
        ckpt_param_map_path: parameter-map file (``current_name checkpoint_name`` per line),
            applied to every part; local path or URL.
        error_on_missing_keys: raise listing every model key the checkpoint lacks.
        dense_ema: TorchEasyRec Dense EMA object: ``reset()``, then load ``dense_ema/``
            (filled in place when it has no ``load_state_dict()``, as TorchEasyRec's).
        use_dense_ema: overlay ``dense_ema/`` values onto the model's parameters (eval/export).
        extra_states: name -> object with ``state_dict()`` (and ``load_state_dict()``, or
            filled in place like ``dense_ema``).
        load_optimizer: ``False`` restores weights only.
        verify: check sizes and checksums against the manifest: ``True`` (default) checks
            data files while loading them and raises afterwards if one is damaged (the
            objects may then hold part of it); ``"first"`` checks every file before anything
            changes (each byte read twice); ``False`` checks nothing.
        strict_shapes: refuse, before anything is loaded, any key whose shape changed. By
            default such a key loads its overlapping block (every dimension from 0 to the
            smaller size; optimizer state alike) and keeps its other values, as TorchEasyRec
            does; each is reported (``PartReport.resized`` / ``shape_mismatched``) and logged.
            A key whose number of dimensions changed is refused either way.
        allow_row_resize: with ``strict_shapes``, still load the overlapping rows of tables
            whose row count alone changed (without it, the default already does).
        param_map: renames given directly (merged over the file's).
        rename_rules: further rename rules (see :mod:`reckpt.remap`).
        storage_options: fsspec options for URLs.
        process_group: the process group (default: the default group, if initialised).
        follow_delta_chain: a delta checkpoint (``model.delta-<step>``) restores its whole
            chain: base, each link's rows, its own dense part (see :mod:`reckpt.restore.chain`);
            ``False`` loads only the delta's own files.
        allow_lossy: allow a chain with int8/fp16 delta dumps (not lossless).
        lenient_param_map: skip parameter-map lines that name no key (of the model or of the
            checkpoint) with a warning, as TorchEasyRec does; by default they are an error.

    Returns:
        The :class:`~reckpt.report.LoadReport`.

    Raises:
        CheckpointNotFoundError: no checkpoint, or no ``model/`` where one is required.
        IncompleteCheckpointError: the checkpoint was never committed.
        IntegrityError: a file's size or checksum does not match the manifest.
        UnsafeCheckpointError: a file carries a pickle payload or points outside the checkpoint.
        ShapeMismatchError: a model key's number of dimensions differs or, with
            ``strict_shapes``, its shape differs (nothing has been loaded).
        KeyMismatchError: with ``error_on_missing_keys``, keys are missing (nothing loaded);
            also a ``RuntimeError``, as TorchEasyRec raises.
        ParamMapError: a bad line in the parameter-map file, or a line naming no key.
        KeyMismatchError: none of the model's keys is in the checkpoint (another model's);
            fewer than half only warns.

    Example:
        >>> # report = restore_model("run/model.ckpt-100", model, optimizer)
        >>> # print(report.summary())
    """
    if verify not in (True, False, "first"):
        raise ConfigError(f"verify={verify!r}: expected True, False or 'first'")
    d = Dist(process_group)
    ckpt = checkpoint_dir.rstrip("/") or checkpoint_dir
    storage = storage_for(ckpt, storage_options)
    state = require_committed(storage, ckpt)
    report = LoadReport(ckpt, legacy=state == "legacy")
    manifest = read_manifest(storage, ckpt, check=bool(verify))
    if follow_delta_chain and manifest is not None and manifest.delta is not None:
        from reckpt.restore.chain import restore_chain

        kwargs = {
            "ckpt_param_map_path": ckpt_param_map_path,
            "error_on_missing_keys": error_on_missing_keys,
            "dense_ema": dense_ema,
            "use_dense_ema": use_dense_ema,
            "extra_states": extra_states,
            "load_optimizer": load_optimizer,
            "verify": verify,
            "strict_shapes": strict_shapes,
            "allow_row_resize": allow_row_resize,
            "param_map": param_map,
            "rename_rules": rename_rules,
            "lenient_param_map": lenient_param_map,
            "storage_options": storage_options,
            "process_group": process_group,
        }
        return restore_chain(
            ckpt,
            manifest,
            model,
            optimizer,
            restore=restore_model,
            restore_kwargs=kwargs,
            allow_lossy=allow_lossy,
            storage_options=storage_options,
            process_group=process_group,
        )
    verifier: ReadVerifier | None = None
    if verify == "first" and manifest is not None:
        verify_collective(storage, ckpt, manifest, d)
        report.verified = True
    elif verify and manifest is not None:
        verifier = ReadVerifier(storage, ckpt, manifest, d)
    meta = read_meta(storage, ckpt)

    names: dict[str, str] = {}
    if ckpt_param_map_path is not None:
        map_storage = storage_for(ckpt_param_map_path, storage_options)
        if not map_storage.isfile(ckpt_param_map_path):
            raise CheckpointNotFoundError(f"ckpt_param_map_path {ckpt_param_map_path}: file does not exist")
        names.update(parse_param_map(map_storage.read_text(ckpt_param_map_path), ckpt_param_map_path))
    names.update(param_map or {})
    rules = list(rename_rules)
    if os.environ.get("INPUT_TILE", "").startswith("3"):
        rules.append(input_tile_rule)
    ld = PartLoader(storage, ckpt, d, process_group, names, rules, report, lenient_param_map)
    jobs: list[LoadJob] = []

    if meta.get("load_model", True) is False:
        ld.skip(MODEL_DIR, "meta.load_model is false", warn=False)
    elif not ld.has(MODEL_DIR):
        raise CheckpointNotFoundError(f"model_ckpt_path[{Storage.join(ckpt, MODEL_DIR)}] not exists")
    else:
        jobs.append(
            LoadJob(
                MODEL_DIR,
                model.state_dict,
                state_applier(model, MODEL_DIR, report),
                strict_shapes=strict_shapes,
                allow_row_resize=allow_row_resize,
                error_on_missing_keys=error_on_missing_keys,
            )
        )

    if optimizer is not None:
        if not load_optimizer:
            ld.skip(OPTIMIZER_DIR, "load_optimizer=False", warn=False)
        elif meta.get("load_optim", True) is False:
            ld.skip(OPTIMIZER_DIR, "meta.load_optim is false", warn=False)
        elif not ld.has(OPTIMIZER_DIR):
            ld.skip(OPTIMIZER_DIR, "the checkpoint has no optimizer/; optimizer state starts fresh")
        else:
            jobs.append(OptimizerJob(ld, model, optimizer, strict_shapes=strict_shapes).job)

    if dense_ema is not None:
        if ld.has(DENSE_EMA_DIR):
            jobs.append(
                LoadJob(
                    DENSE_EMA_DIR,
                    dense_ema.state_dict,
                    state_applier(dense_ema, DENSE_EMA_DIR, report),
                    strict_shapes=strict_shapes,
                    warn_on_missing_keys=False,
                )
            )
        else:
            ld.skip(DENSE_EMA_DIR, "the checkpoint has no dense_ema/; EMA will restart")
    if use_dense_ema:
        if ld.has(DENSE_EMA_DIR):
            jobs.append(
                LoadJob(
                    DENSE_EMA_DIR,
                    lambda: dict(model.named_parameters()),
                    report_as="dense_ema_overlay",
                    strict_shapes=strict_shapes,
                    warn_on_missing_keys=False,
                )
            )
        else:
            ld.skip(
                "dense_ema_overlay", "use_dense_ema: the checkpoint has no dense_ema/; keeping raw parameters"
            )

    for name, obj in (extra_states or {}).items():
        validate_extra_name(name)
        if not ld.has(name):
            ld.skip(name, f"the checkpoint has no {name}/; {name} keeps its current state")
            continue
        jobs.append(
            LoadJob(name, obj.state_dict, state_applier(obj, name, report), strict_shapes=strict_shapes)
        )

    if verifier is not None:
        verifier.before_load(job.part for job in jobs)
        ld.verifier = verifier
    managed_collision(ld, model, jobs)
    ld.check(jobs)
    from reckpt.dynamic.load import restore_step  # imports reckpt.save.engine

    dynamic = restore_step(
        ckpt,
        model,
        meta,
        optimizer_restored=optimizer is not None and load_optimizer,
        upsert=manifest is not None and manifest.delta is not None,  # a delta holds touched rows only
        storage_options=storage_options,
        process_group=process_group,
    )
    try:
        for job in jobs:
            if (
                job.part == DENSE_EMA_DIR
                and job.report_as is None
                and callable(getattr(dense_ema, "reset", None))
            ):
                # TorchEasyRec order: the EMA restarts from the just-restored weights, then loads.
                dense_ema.reset()
            ld.load(job)
    except Exception as e:
        if verifier is not None:
            verifier.explain(e)  # a damaged file is the real cause: say so
        raise
    if verifier is not None:
        verifier.after_load()
        report.verified = True
    if dense_ema is not None and not ld.has(DENSE_EMA_DIR) and callable(getattr(dense_ema, "reset", None)):
        dense_ema.reset()
    if dynamic is not None:
        dynamic.apply(report)
    logger.info("%s", report.summary())
    return report
