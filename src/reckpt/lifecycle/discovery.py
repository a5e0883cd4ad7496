"""Finding checkpoints in a model_dir: latest, best, and a full listing.

Only committed checkpoints count (:func:`reckpt.commit.state.checkpoint_state`); names are
parsed with one full-match parser (:func:`reckpt.naming.parse_step`). Local and remote
model_dirs go through the same storage layer and behave alike.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from reckpt.best import BestRule, best_step, default_larger_is_better, resolve_metric_name
from reckpt.commit.state import checkpoint_state
from reckpt.errors import CheckpointNotFoundError, ConfigError, IncompleteCheckpointError, IntegrityError
from reckpt.format.damage import is_marked_damaged
from reckpt.format.eval_results import TRAIN_EVAL_RESULT_FILENAME, read_checkpoint_metrics, read_eval_results
from reckpt.format.manifest import chain_names, read_manifest
from reckpt.naming import (
    MODEL_DIR,
    OPTIMIZER_DIR,
    checkpoint_name,
    parse_any_step,
    parse_delta_step,
    parse_step,
)
from reckpt.policy import CheckpointInfo
from reckpt.storage.core import Storage, storage_for

__all__ = [
    "latest_checkpoint",
    "best_checkpoint",
    "best_rule",
    "list_checkpoints",
    "committed_steps",
    "scan",
    "latest_in",
    "scan_in",
    "checkpoints_in",
    "best_in",
]

logger = logging.getLogger(__name__)


def committed_steps(model_dir: str, storage: Storage) -> list[int]:
    """Steps of the committed (or legacy) ``model.ckpt-<step>`` directories, ascending."""
    steps = []
    for name in storage.ls(model_dir):
        step = parse_step(name)
        if step is not None and checkpoint_state(storage, Storage.join(model_dir, name)) in (
            "committed",
            "legacy",
        ):
            steps.append(step)
    return sorted(steps)


def latest_checkpoint(
    model_dir: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[str | None, int]:
    """``(path, step)`` of the newest committed checkpoint, ``(None, -1)`` when there is none.

    TorchEasyRec semantics with its sharp edges fixed: an explicit checkpoint path
    (``…/model.ckpt-<step>``, trailing ``/`` allowed) is returned only when it is committed;
    only committed checkpoints that are not marked damaged count (:mod:`reckpt.format.damage`); names
    are parsed with one full-match parser. A legacy
    layout with ``model/`` or ``optimizer/`` directly in ``model_dir`` is returned as step 0.

    Raises:
        IncompleteCheckpointError: an explicit checkpoint path was never committed.
        CheckpointNotFoundError: an explicit checkpoint path does not exist.

    Example:
        >>> latest_checkpoint("memory://empty-run")
        (None, -1)
    """
    return latest_in(storage_for(model_dir, storage_options), model_dir)


def latest_in(storage: Storage, model_dir: str) -> tuple[str | None, int]:
    """:func:`latest_checkpoint` on an open storage."""
    path = model_dir.rstrip("/") or model_dir
    step = parse_step(path)
    if step is not None:
        state: str = checkpoint_state(storage, path)
        if state == "absent":
            raise CheckpointNotFoundError(f"{path}: checkpoint does not exist")
        if state == "incomplete":
            raise IncompleteCheckpointError(f"{path}: checkpoint was never committed")
        return path, step
    for step in reversed(committed_steps(path, storage)):  # a known-damaged one is skipped
        found = Storage.join(path, checkpoint_name(step))
        if not is_marked_damaged(storage, found):
            return found, step
    if any(storage.isdir(Storage.join(path, p)) for p in (MODEL_DIR, OPTIMIZER_DIR)):
        return path, 0
    return None, -1


def scan(
    model_dir: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    eval_result_filename: str = TRAIN_EVAL_RESULT_FILENAME,
    with_size: bool = True,
) -> tuple[list[CheckpointInfo], dict[int, dict[str, float]]]:
    """One pass over a model_dir: its checkpoints, and step -> eval metrics.

    Reads the results file once and each committed checkpoint's manifest and metrics sidecar
    once. Metrics come from the results file, overridden per key by each checkpoint's sidecar
    (disagreements are logged; the sidecar wins); steps whose checkpoint is gone keep their
    results-file metrics, so best selection can tell a pruned best from a missing metric.
    """
    return scan_in(
        storage_for(model_dir, storage_options),
        model_dir,
        eval_result_filename=eval_result_filename,
        with_size=with_size,
    )


def scan_in(
    storage: Storage,
    model_dir: str,
    *,
    eval_result_filename: str = TRAIN_EVAL_RESULT_FILENAME,
    with_size: bool = True,
) -> tuple[list[CheckpointInfo], dict[int, dict[str, float]]]:
    """:func:`scan` on an open storage."""
    root = model_dir.rstrip("/") or model_dir
    results = Storage.join(root, eval_result_filename)
    by_step = {s: dict(m) for s, m in read_eval_results(storage, results).by_step.items()}
    found: list[tuple[int, str, str, float | None, int | None, str, tuple[int, ...]]] = []
    for name in storage.ls(root):
        step, kind = parse_step(name), "full"
        if step is None:
            step, kind = parse_delta_step(name), "delta"
        if step is None:
            continue
        path = Storage.join(root, name)
        state: str = checkpoint_state(storage, path)
        if state == "absent":  # a file that merely carries the name
            continue
        if state in ("committed", "legacy") and is_marked_damaged(storage, path):
            state = "damaged"  # failed verification: never latest, best or counted as kept
        created, size = None, None
        needs: tuple[int, ...] = ()
        try:
            manifest = read_manifest(storage, path) if state == "committed" else None
            side = read_checkpoint_metrics(storage, path) if state == "committed" else {}
        except IntegrityError as e:
            logger.warning("%s; using %s for step %d", e, results, step)
            manifest, side = None, {}
        if manifest is not None:
            created = manifest.created_at
            needs = tuple(parse_any_step(n) or 0 for n in chain_names(manifest, path)[:-1])
            size = sum(r.size for r in manifest.files.values())
        elif with_size:
            size = int(storage.fs.du(path))
        in_file = by_step.get(step)
        if side and in_file is not None and any(in_file.get(k) != v for k, v in side.items()):
            logger.warning(
                "step %d: %s says %s but the checkpoint's metrics sidecar says %s; using the sidecar",
                step,
                results,
                in_file,
                side,
            )
        if side:
            by_step[step] = {**(in_file or {}), **side}
        found.append((step, path, state, created, size, kind, needs))
    infos = [
        CheckpointInfo(st, p, state, c, sz, by_step.get(st, {}), kind, needs)
        for st, p, state, c, sz, kind, needs in found
    ]
    return sorted(infos, key=lambda c: c.step), by_step


def list_checkpoints(
    model_dir: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    eval_result_filename: str = TRAIN_EVAL_RESULT_FILENAME,
    with_size: bool = True,
) -> list[CheckpointInfo]:
    """Every ``model.ckpt-<step>`` directory (committed or not) with its state, size, time, metrics.

    Metrics come from the results file, overridden by the checkpoint's sidecar (see :func:`scan`).
    """
    return checkpoints_in(
        storage_for(model_dir, storage_options),
        model_dir,
        eval_result_filename=eval_result_filename,
        with_size=with_size,
    )


def checkpoints_in(
    storage: Storage,
    model_dir: str,
    *,
    eval_result_filename: str = TRAIN_EVAL_RESULT_FILENAME,
    with_size: bool = True,
) -> list[CheckpointInfo]:
    """:func:`list_checkpoints` on an open storage."""
    infos, _ = scan_in(storage, model_dir, eval_result_filename=eval_result_filename, with_size=with_size)
    return infos


def _export_fields(export_config: Any) -> tuple[str | None, bool | None, str | None]:
    """``(metric, larger_is_better, exporter_type)`` of an ``ExportConfig``-like; ``None``: unset."""
    if export_config is None:
        return None, None, None
    has_field = getattr(export_config, "HasField", None)
    if callable(has_field):  # a protobuf ExportConfig: its "auc" default only counts when set
        metric = export_config.best_exporter_metric if has_field("best_exporter_metric") else None
    else:
        metric = getattr(export_config, "best_exporter_metric", None)
    larger = getattr(export_config, "metric_larger_is_better", None)
    exporter_type = getattr(export_config, "exporter_type", None)
    return metric or None, None if larger is None else bool(larger), exporter_type


def best_rule(export_config: Any) -> BestRule:
    """The :class:`~reckpt.best.BestRule` pruning applies for an ``ExportConfig``-like (or ``None``).

    Its metric and direction are the config's; with ``exporter_type == "best"`` a best that
    cannot be told stops pruning (as TorchEasyRec's failing best lookup does).
    """
    metric, larger, exporter_type = _export_fields(export_config)
    return BestRule(metric, larger, required=exporter_type == "best")


def best_checkpoint(
    model_dir: str,
    export_config: Any = None,
    eval_result_filename: str = TRAIN_EVAL_RESULT_FILENAME,
    *,
    metric: str | None = None,
    larger_is_better: bool | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[str | None, int]:
    """``(path, step)`` of the committed checkpoint with the best eval metric.

    Args:
        model_dir: the run directory (local or URL).
        export_config: anything with TorchEasyRec's ``ExportConfig`` fields
            (``best_exporter_metric``, ``metric_larger_is_better``).
        eval_result_filename: the JSON-lines results file inside ``model_dir``.
        metric: the metric name (overrides ``export_config``). Unset: a single recorded metric
            is used; among several, ``auc``; otherwise a :class:`ConfigError` lists them.
        larger_is_better: direction (overrides ``export_config``); unset in both, by the
            metric's name (:func:`reckpt.best.default_larger_is_better`: losses are
            smaller-is-better, everything else larger).

    Falls back to :func:`latest_checkpoint` when no metrics are recorded at all. When the best
    step's checkpoint was pruned or is incomplete, the best committed one is returned with a
    warning naming the missing step.

    Example:
        >>> # best_checkpoint("run", metric="grouped_auc", larger_is_better=False)
    """
    return best_in(
        storage_for(model_dir, storage_options),
        model_dir,
        export_config,
        eval_result_filename,
        metric=metric,
        larger_is_better=larger_is_better,
    )


def best_in(
    storage: Storage,
    model_dir: str,
    export_config: Any = None,
    eval_result_filename: str = TRAIN_EVAL_RESULT_FILENAME,
    *,
    metric: str | None = None,
    larger_is_better: bool | None = None,
) -> tuple[str | None, int]:
    """:func:`best_checkpoint` on an open storage."""
    cfg_metric, cfg_larger, _ = _export_fields(export_config)
    metric = metric if metric is not None else cfg_metric
    larger_arg = cfg_larger if larger_is_better is None else larger_is_better
    root = model_dir.rstrip("/") or model_dir
    checkpoints, by_step = scan_in(storage, root, eval_result_filename=eval_result_filename, with_size=False)
    names = {k for m in by_step.values() for k in m}
    if not names:
        logger.info("%s: no eval metrics recorded; using the latest checkpoint", root)
        return latest_in(storage, root)
    try:
        name = resolve_metric_name(metric, names, Storage.join(root, eval_result_filename))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    larger = default_larger_is_better(name) if larger_arg is None else larger_arg
    committed = {c.step: c.path for c in checkpoints if c.committed}
    best = best_step(by_step, name, larger)
    if best is not None and best in committed:
        return committed[best], best
    fallback = best_step({s: m for s, m in by_step.items() if s in committed}, name, larger)
    if fallback is None:
        logger.warning(
            "%s: best step %s by %s has no committed checkpoint; using the latest", root, best, name
        )
        return latest_in(storage, root)
    logger.warning(
        "%s: the best step by %s is %s, but model.ckpt-%s is not a committed checkpoint (pruned or"
        " incomplete); using the best committed one, step %d",
        root,
        name,
        best,
        best,
        fallback,
    )
    return committed[fallback], fallback
