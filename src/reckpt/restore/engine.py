"""``restore_model``: load a checkpoint into a (possibly changed) model, part by part.

The public entry point only resolves the target (:func:`~reckpt.restore.target.resolve_target`:
the storage is opened once, here) and dispatches: a delta checkpoint to its chain
(:func:`~reckpt.restore.chain.restore_chain`), anything else to the single-checkpoint engine
(:func:`~reckpt.restore.single.restore_one`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from reckpt.remap import RenameRule
from reckpt.report import LoadReport
from reckpt.restore.chain import restore_chain
from reckpt.restore.single import restore_one
from reckpt.restore.target import RestoreOptions, resolve_target

__all__ = ["restore_model"]


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
    target = resolve_target(
        checkpoint_dir, verify=verify, storage_options=storage_options, process_group=process_group
    )
    opts = RestoreOptions(
        ckpt_param_map_path=ckpt_param_map_path,
        error_on_missing_keys=error_on_missing_keys,
        dense_ema=dense_ema,
        use_dense_ema=use_dense_ema,
        extra_states=extra_states,
        load_optimizer=load_optimizer,
        verify=verify,
        strict_shapes=strict_shapes,
        allow_row_resize=allow_row_resize,
        param_map=param_map,
        rename_rules=rename_rules,
        lenient_param_map=lenient_param_map,
        storage_options=storage_options,
    )
    if follow_delta_chain and target.is_delta:
        return restore_chain(target, model, optimizer, opts, allow_lossy=allow_lossy)
    return restore_one(target, model, optimizer, opts)
