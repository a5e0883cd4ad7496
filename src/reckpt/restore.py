"""``restore_model``: load a checkpoint into a (possibly changed) model, part by part."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

from reckpt.dcp_io import SafeReader, dcp_call, read_dcp_metadata
from reckpt.dist import Dist
from reckpt.errors import CheckpointNotFoundError, KeyMismatchError
from reckpt.manifest import read_json_object, read_manifest
from reckpt.naming import (
    DCP_METADATA_FILE,
    DENSE_EMA_DIR,
    META_FILE,
    MODEL_DIR,
    OPTIMIZER_DIR,
    validate_extra_name,
)
from reckpt.optim import (
    init_optimizer_state,
    is_index_keyed,
    is_keyed_optimizer,
    load_optimizer_state_dict,
    optimizer_param_names,
    optimizer_state_dict,
)
from reckpt.planner import PartialLoadPlanner, saved_shapes
from reckpt.remap import (
    RenameRule,
    ec_list_to_ec_dict_rule,
    index_keyed_optimizer_rule,
    input_tile_rule,
    parse_param_map,
)
from reckpt.report import LoadReport, PartReport
from reckpt.storage import Storage, storage_for
from reckpt.verify import require_committed, verify_collective

__all__ = ["restore_model", "read_meta"]

logger = logging.getLogger(__name__)

_GROUP_PARAMS = re.compile(r"param_groups\.[0-9]+\.params")


def read_meta(storage: Storage, checkpoint_dir: str) -> dict[str, Any]:
    """The checkpoint's ``meta`` flags (``{}`` when absent)."""
    return read_json_object(storage, Storage.join(checkpoint_dir, META_FILE)) or {}


class _Loader:
    """Shared context of one restore: storage, ranks, renames, the report."""

    def __init__(
        self,
        storage: Storage,
        ckpt: str,
        d: Dist,
        pg: Any,
        param_map: dict[str, str],
        rules: Sequence[RenameRule],
        report: LoadReport,
    ) -> None:
        self.storage, self.ckpt, self.d, self.pg = storage, ckpt, d, pg
        self.param_map, self.rules, self.report = param_map, list(rules), report

    def has(self, part: str) -> bool:
        return self.storage.exists(Storage.join(self.ckpt, part, DCP_METADATA_FILE))

    def load(
        self,
        part: str,
        state_dict: dict[str, Any],
        *,
        report_as: str | None = None,
        extra_rules: Sequence[RenameRule] = (),
        exclude_keys: Sequence[str] = (),
        allow_row_resize: bool = False,
        reinit_on_mismatch: bool = False,
        error_on_missing_keys: bool = False,
        warn_on_missing_keys: bool = True,
    ) -> PartReport:
        """Collective: resolve keys on every rank (raising before any read), then DCP-load."""
        dcp_dir = Storage.join(self.ckpt, part)
        md = read_dcp_metadata(self.storage, dcp_dir)
        planner = PartialLoadPlanner(
            warn_on_missing_keys=warn_on_missing_keys,
            param_map=self.param_map,
            rename_rules=[*self.rules, *extra_rules, ec_list_to_ec_dict_rule(saved_shapes(md))],
            exclude_keys=exclude_keys,
            allow_row_resize=allow_row_resize,
            reinit_on_mismatch=reinit_on_mismatch,
            source=dcp_dir,
        )
        err: BaseException | None = None
        try:
            planner.set_up_planner(state_dict, md, self.d.is_coordinator)
            res = planner.resolve()
            if error_on_missing_keys and res.missing:
                raise KeyMismatchError(
                    f"{dcp_dir}: {len(res.missing)} key(s) of the current {part} are missing from"
                    " the checkpoint: "
                    + ", ".join(sorted(res.missing))
                    + ". Map them with a parameter-map file, or restore with error_on_missing_keys=False"
                    " to keep their initial values."
                )
        except Exception as e:
            err = e
        self.d.raise_if_any(err, f"resolving keys of {dcp_dir}")
        reader = SafeReader(dcp_dir, self.storage, md)
        dcp_call(
            dcp_load,
            f"loading {dcp_dir}",
            state_dict,
            storage_reader=reader,
            planner=planner,
            process_group=self.pg,
            no_dist=not self.d.active,
        )
        pr = planner.resolution
        pr.missing.sort()
        pr.resized.sort()
        pr.reinitialized.sort()
        self.report.parts[report_as or part] = pr
        for key in pr.reinitialized:
            logger.warning(
                "%s: [%s] does not fit the checkpoint's shape; keeping its initial value", dcp_dir, key
            )
        return pr

    def skip(self, part: str, why: str, warn: bool = True) -> None:
        self.report.part(part).skipped = why
        if warn:
            logger.warning("%s: %s", self.ckpt, why)
            self.report.notes.append(f"{part}: {why}")


def _restore_optimizer(ld: _Loader, model: torch.nn.Module, optimizer: Any) -> None:
    created = init_optimizer_state(optimizer)
    target = optimizer_state_dict(model, optimizer, "name")
    md = read_dcp_metadata(ld.storage, Storage.join(ld.ckpt, OPTIMIZER_DIR))
    rules: list[RenameRule] = []
    keyed = is_keyed_optimizer(optimizer)
    if not keyed and is_index_keyed(md.state_dict_metadata):
        names = optimizer_param_names(model, optimizer)
        rules.append(index_keyed_optimizer_rule({n: i for i, n in enumerate(names)}))
    n_groups = len(target.get("param_groups", []))
    exclude = [f"param_groups.{i}.params" for i in range(n_groups)]
    pr = ld.load(OPTIMIZER_DIR, target, extra_rules=rules, exclude_keys=exclude, reinit_on_mismatch=True)
    # Saved parameter lists are replaced by the current ones on purpose: not "unused".
    pr.unused = [k for k in pr.unused if not _GROUP_PARAMS.fullmatch(k)]
    load_optimizer_state_dict(model, optimizer, target)
    if keyed or not created:
        return
    # State that init_optimizer_state created for parameters the checkpoint does not know
    # is dropped, so their first real step initialises it exactly as in a fresh run.
    missing = set(pr.missing)
    created_ids = {id(p) for p in created}
    by_param = dict(zip(optimizer_param_names(model, optimizer), _flat_params(optimizer), strict=True))
    for name, p in by_param.items():
        keys = [f"state.{name}.{k}" for k in optimizer.state.get(p, {})]
        if id(p) in created_ids and keys and all(k in missing for k in keys):
            optimizer.state.pop(p, None)
            pr.reinitialized.append(f"state.{name}")


def _flat_params(optimizer: Any) -> list[Any]:
    return [p for g in optimizer.param_groups for p in g["params"]]


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
    verify: bool = True,
    allow_row_resize: bool = False,
    param_map: Mapping[str, str] | None = None,
    rename_rules: Sequence[RenameRule] = (),
    storage_options: Mapping[str, Any] | None = None,
    process_group: Any = None,
) -> LoadReport:
    """Restore a checkpoint into ``model`` (and optimizer, EMA, extra state), partially if needed.

    Collective: every rank calls it. Each rank verifies a share of the files (unless
    ``verify=False``), resolves its keys against the checkpoint's metadata (raising on every
    rank before anything is read when a shape does not fit or, with ``error_on_missing_keys``,
    a key is missing), then loads its shards; DCP reshards across world-size changes.

    Args:
        checkpoint_dir: a committed checkpoint (``<model_dir>/model.ckpt-<step>``).
        model: the model to fill; keys the checkpoint lacks keep their values (reported).
        optimizer: optional; its state is initialised without data, then loaded.
        ckpt_param_map_path: parameter-map file (``current_name checkpoint_name`` per line),
            applied to every part; local path or URL.
        error_on_missing_keys: raise listing every model key the checkpoint lacks.
        dense_ema: TorchEasyRec Dense EMA object: ``reset()``, then load ``dense_ema/``.
        use_dense_ema: overlay ``dense_ema/`` values onto the model's parameters (eval/export).
        extra_states: name -> object with ``state_dict()``/``load_state_dict()``.
        load_optimizer: ``False`` restores weights only.
        verify: check sizes and checksums against the manifest first (default).
        allow_row_resize: load the overlapping rows of tables whose row count changed.
        param_map: renames given directly (merged over the file's).
        rename_rules: further rename rules (see :mod:`reckpt.remap`).
        storage_options: fsspec options for URLs.
        process_group: the process group (default: the default group, if initialised).

    Returns:
        The :class:`~reckpt.report.LoadReport`.

    Raises:
        CheckpointNotFoundError: no checkpoint, or no ``model/`` where one is required.
        IncompleteCheckpointError: the checkpoint was never committed.
        IntegrityError: a file's size or checksum does not match the manifest.
        UnsafeCheckpointError: a file carries a pickle payload or points outside the checkpoint.
        ShapeMismatchError: a model key's shape differs (nothing has been loaded).
        KeyMismatchError: with ``error_on_missing_keys``, keys are missing (nothing loaded).
        ParamMapError: a bad line in the parameter-map file.

    Example:
        >>> # report = restore_model("run/model.ckpt-100", model, optimizer)
        >>> # print(report.summary())
    """
    d = Dist(process_group)
    ckpt = checkpoint_dir.rstrip("/") or checkpoint_dir
    storage = storage_for(ckpt, storage_options)
    state = require_committed(storage, ckpt)
    report = LoadReport(ckpt, legacy=state == "legacy")
    manifest = read_manifest(storage, ckpt)
    if verify and manifest is not None:
        verify_collective(storage, ckpt, manifest, d)
        report.verified = True
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
    ld = _Loader(storage, ckpt, d, process_group, names, rules, report)

    if meta.get("load_model", True) is False:
        ld.skip(MODEL_DIR, "meta.load_model is false", warn=False)
    elif not ld.has(MODEL_DIR):
        raise CheckpointNotFoundError(f"model_ckpt_path[{Storage.join(ckpt, MODEL_DIR)}] not exists")
    else:
        sd = model.state_dict()
        ld.load(MODEL_DIR, sd, allow_row_resize=allow_row_resize, error_on_missing_keys=error_on_missing_keys)
        model.load_state_dict(sd)

    if optimizer is not None:
        if not load_optimizer:
            ld.skip(OPTIMIZER_DIR, "load_optimizer=False", warn=False)
        elif meta.get("load_optim", True) is False:
            ld.skip(OPTIMIZER_DIR, "meta.load_optim is false", warn=False)
        elif not ld.has(OPTIMIZER_DIR):
            ld.skip(OPTIMIZER_DIR, "the checkpoint has no optimizer/; optimizer state starts fresh")
        else:
            _restore_optimizer(ld, model, optimizer)

    if dense_ema is not None:
        if callable(getattr(dense_ema, "reset", None)):
            dense_ema.reset()
        if ld.has(DENSE_EMA_DIR):
            ema_sd = dense_ema.state_dict()
            ld.load(DENSE_EMA_DIR, ema_sd, warn_on_missing_keys=False)
            dense_ema.load_state_dict(ema_sd)
        else:
            ld.skip(DENSE_EMA_DIR, "the checkpoint has no dense_ema/; EMA will restart")
    if use_dense_ema:
        if ld.has(DENSE_EMA_DIR):
            params = {n: p for n, p in model.named_parameters()}
            ld.load(DENSE_EMA_DIR, params, report_as="dense_ema_overlay", warn_on_missing_keys=False)
        else:
            ld.skip(
                "dense_ema_overlay", "use_dense_ema: the checkpoint has no dense_ema/; keeping raw parameters"
            )

    for name, obj in (extra_states or {}).items():
        validate_extra_name(name)
        if not ld.has(name):
            ld.skip(name, f"the checkpoint has no {name}/; {name} keeps its current state")
            continue
        extra_sd = obj.state_dict()
        ld.load(name, extra_sd)
        obj.load_state_dict(extra_sd)
    logger.info("%s", report.summary())
    return report
