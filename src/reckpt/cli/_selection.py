"""Best-selection commands: best, prune (retention, which never deletes the best), plot.

They share the metric's direction: ``--larger-is-better`` / ``--smaller-is-better``, else the
metric's built-in one (:func:`reckpt.best.default_larger_is_better`).
"""

from __future__ import annotations

import argparse

from reckpt.cli._output import emit as _emit
from reckpt.cli._train import flag

__all__ = ["cmd_best", "cmd_prune", "cmd_plot", "direction_flags"]


def direction(args: argparse.Namespace) -> bool | None:
    """``--larger-is-better`` / ``--smaller-is-better``; ``None``: the metric's built-in direction."""
    if getattr(args, "larger_is_better", False) and getattr(args, "smaller_is_better", False):
        from reckpt.errors import ConfigError

        raise ConfigError("give one of --larger-is-better and --smaller-is-better, not both")
    if getattr(args, "larger_is_better", False):
        return True
    return False if getattr(args, "smaller_is_better", False) else None


def direction_flags(p: argparse.ArgumentParser) -> None:
    flag(
        p,
        "larger-is-better",
        action="store_true",
        help="default: by the metric (auc, accuracy, recall@k ...)",
    )
    flag(p, "smaller-is-better", action="store_true", help="default: by the metric (loss, logloss, mse ...)")


def cmd_best(args: argparse.Namespace) -> int:
    from reckpt.errors import CheckpointNotFoundError
    from reckpt.lifecycle.discovery import best_checkpoint

    path, step = best_checkpoint(
        args.model_dir,
        None,
        args.eval_result_filename,
        metric=args.metric,
        larger_is_better=direction(args),  # None: by the metric's name
    )
    if path is None:
        raise CheckpointNotFoundError(f"{args.model_dir}: no committed checkpoint")
    _emit(args, {"path": path, "step": step, "metric": args.metric}, [path])
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from reckpt.best import BestRule, find_best, resolve_metric_name
    from reckpt.errors import ConfigError
    from reckpt.lifecycle.discovery import checkpoints_in
    from reckpt.lifecycle.pruner import Pruner
    from reckpt.policy import BestN, EveryNSteps, LatestN, RetentionPolicy
    from reckpt.storage.core import storage_for

    larger = direction(args)  # None: by the metric's name (an unknown metric needs a direction)
    policies: list[RetentionPolicy] = []
    if args.keep_last:
        policies.append(LatestN(args.keep_last))
    for metric in args.keep_best or []:
        policies.append(BestN(args.keep_best_n, metric, larger))
    if args.keep_every_steps:
        policies.append(EveryNSteps(args.keep_every_steps))
    if not policies:
        raise ConfigError("prune: give at least one of --keep-last, --keep-best, --keep-every-steps")
    # The best checkpoint is never deleted while it is known (--metric, else the only metric
    # recorded, else auc); a metric named here but not recorded stops the prune.
    best = BestRule(args.metric, larger, required=args.metric is not None)
    storage = storage_for(args.model_dir)  # the listing and the pruner's passes go through it
    infos = checkpoints_in(
        storage, args.model_dir, eval_result_filename=args.eval_result_filename, with_size=False
    )
    metrics = {c.step: c.metrics for c in infos if c.committed}
    recorded = {k for m in metrics.values() for k in m}
    try:
        for metric in (args.keep_best or []) if recorded else []:
            resolve_metric_name(metric, recorded, args.model_dir)  # a typo must not keep nothing
        found = find_best(metrics, best)
    except ValueError as e:
        raise ConfigError(f"prune: {e}") from e
    pruner = Pruner(args.model_dir, storage, policies, set, args.eval_result_filename, best)
    doomed = pruner.plan()
    if not args.dry_run:
        pruner.run_once()
    verb = "would delete" if args.dry_run else "deleted"
    lines = [f"{verb} {c.path}" for c in doomed] or ["nothing to delete"]
    if found is not None:
        lines.append(f"kept the best checkpoint by {found[1]}: step {found[0]}")
    _emit(
        args,
        {
            "dry_run": args.dry_run,
            "deleted" if not args.dry_run else "would_delete": [c.path for c in doomed],
            "best": None if found is None else {"step": found[0], "metric": found[1]},
        },
        lines,
    )
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from reckpt.cli._plot import plot_metrics

    data = plot_metrics(
        args.model_dir,
        args.output,
        metric=args.metric,
        larger_is_better=direction(args),
        eval_result_filename=args.eval_result_filename,
    )
    _emit(args, data, [f"wrote {args.output} ({len(data['steps'])} points, best step {data['best_step']})"])
    return 0
