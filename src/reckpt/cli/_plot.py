"""``reckpt plot``: the eval metric against step (checkpoints marked, the best highlighted) and,
from the trainer's ``train_log.jsonl``, the training loss, checkpoint sizes and save stalls.

Without a training log the PNG is the metric plot alone; with one, four panels share the step
axis: the metric, the loss, each save's size, each save's stall (and its total time).
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from reckpt.format.eval_results import TRAIN_EVAL_RESULT_FILENAME
from reckpt.lifecycle.discovery import best_checkpoint, scan
from reckpt.policy import resolve_metric_name
from reckpt.storage.core import Storage, storage_for

__all__ = ["plot_metrics", "read_train_log", "TrainLogData", "TRAIN_LOG"]

logger = logging.getLogger(__name__)

TRAIN_LOG = "train_log.jsonl"
"""The trainer's JSON-lines log in the model_dir (``reckpt.trainer.log``)."""

SAVE_FIELDS = ("step", "bytes", "stall_s", "seconds", "gbps", "tier", "kind")


@dataclass(slots=True)
class TrainLogData:
    """A parsed training log: loss per step and one record per save (a later line for a step wins)."""

    loss: dict[int, float] = field(default_factory=dict)
    saves: dict[int, dict[str, Any]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.loss or self.saves)


def read_train_log(storage: Storage, path: str) -> TrainLogData:
    """Parse ``train_log.jsonl``; lines that are not JSON objects with a step (a run killed
    mid-line) are skipped and listed in ``problems``. A missing file is an empty log."""
    out = TrainLogData()
    if not storage.isfile(path):
        return out
    for lineno, raw in enumerate(storage.read_text(path).splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            doc = json.loads(raw)
            step = int(doc["step"])
        except (ValueError, KeyError, TypeError) as e:
            out.problems.append(f"{path}:{lineno}: {e}")
            continue
        event = doc.get("event")
        if event is None and isinstance(doc.get("loss"), int | float):
            out.loss[step] = float(doc["loss"])
        elif event == "save":
            out.saves[step] = {k: doc.get(k) for k in SAVE_FIELDS}
    if out.problems:
        logger.warning(
            "%d garbled line(s) skipped in %s (first: %s)", len(out.problems), path, out.problems[0]
        )
    return out


def plot_metrics(
    model_dir: str,
    output: str,
    *,
    metric: str | None = None,
    larger_is_better: bool | None = None,
    eval_result_filename: str = TRAIN_EVAL_RESULT_FILENAME,
) -> dict[str, Any]:
    """Draw the PNG; returns the plotted data.

    Keys: ``metric``, ``steps``, ``values``, ``checkpoints``, ``best_step`` (the metric plot), and,
    when the model_dir has a training log, ``train_log`` (its path), ``loss`` (``{"steps",
    "values"}``) and ``saves`` (one ``{"step", "bytes", "stall_s", "seconds", "gbps", "tier",
    "kind"}`` per save). The best point follows the metric's direction: ``larger_is_better``,
    else the metric's built-in one (losses smaller, AUC larger;
    :func:`reckpt.best.default_larger_is_better`).

    Raises:
        ValueError: no metrics are recorded and there is no training log, the metric cannot
            be chosen (listed in the message), or it has no built-in direction and none was given.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = model_dir.rstrip("/")
    log_path = Storage.join(root, TRAIN_LOG)
    log = read_train_log(storage_for(root), log_path)
    infos, by_step = scan(root, eval_result_filename=eval_result_filename, with_size=False)
    names = {k for m in by_step.values() for k in m}
    committed = sorted(c.step for c in infos if c.committed)
    name: str | None = None
    steps: list[int] = []
    best = -1  # what best_checkpoint answers when there is none
    if names:
        name = resolve_metric_name(metric, names, Storage.join(root, eval_result_filename))
        steps = sorted(s for s, m in by_step.items() if name in m)
        _, best = best_checkpoint(
            root, metric=name, larger_is_better=larger_is_better, eval_result_filename=eval_result_filename
        )
    elif not log:
        raise ValueError(f"{Storage.join(root, eval_result_filename)}: no eval metrics recorded to plot")
    values = [by_step[s][name] for s in steps] if name else []

    if log:
        fig, axes = plt.subplots(4, 1, figsize=(8, 11), dpi=100, sharex=True)
        metric_ax = axes[0]
    else:
        fig, metric_ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    _metric_panel(metric_ax, name, steps, values, committed, best, by_step)
    metric_ax.set_title(root)
    if log:
        _log_panels(axes[1:], log)
        axes[-1].set_xlabel("step")
    else:
        metric_ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)
    data: dict[str, Any] = {
        "metric": name,
        "steps": steps,
        "values": values,
        "checkpoints": committed,
        "best_step": best,
    }
    if log:
        data["train_log"] = log_path
        data["loss"] = {"steps": sorted(log.loss), "values": [log.loss[s] for s in sorted(log.loss)]}
        data["saves"] = [log.saves[s] for s in sorted(log.saves)]
    return data


def _metric_panel(
    ax: Any,
    name: str | None,
    steps: list[int],
    values: list[float],
    committed: list[int],
    best: int,
    by_step: dict[int, dict[str, float]],
) -> None:
    """Today's metric plot: the curve, committed checkpoints circled, the best starred."""
    if name is None:
        ax.text(0.5, 0.5, "no eval recorded yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylabel("eval metric")
        return
    ax.plot(steps, values, marker="o", ms=3, lw=1.2, label=name)
    kept = [s for s in steps if s in committed]
    ax.scatter(
        kept, [by_step[s][name] for s in kept], s=60, facecolors="none", edgecolors="C2", label="checkpoint"
    )
    if best in by_step and name in by_step[best]:
        ax.scatter(
            [best],
            [by_step[best][name]],
            s=160,
            marker="*",
            color="C3",
            zorder=5,
            label=f"best (step {best})",
        )
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
    ax.legend()


def _log_panels(axes: Any, log: TrainLogData) -> None:
    """Loss; checkpoint size (MB; full and delta saves apart); save stall and total time (s)."""
    loss_ax, size_ax, stall_ax = axes
    steps = sorted(log.loss)
    loss_ax.plot(steps, [log.loss[s] for s in steps], lw=1.0, color="C1", label="train loss")
    loss_ax.set_ylabel("loss")
    saves = [log.saves[s] for s in sorted(log.saves)]
    for kind, color in (("full", "C0"), ("delta", "C4")):
        mine = [r for r in saves if (r.get("kind") or "full") == kind and r.get("bytes") is not None]
        if mine:
            size_ax.bar(
                [r["step"] for r in mine],
                [r["bytes"] / 1e6 for r in mine],
                width=_bar_width(saves),
                color=color,
                label=f"{kind} checkpoint",
            )
    size_ax.set_ylabel("checkpoint size (MB)")
    timed = [r for r in saves if r.get("stall_s") is not None]
    stall_ax.plot([r["step"] for r in timed], [r["stall_s"] for r in timed], marker="o", ms=3, label="stall")
    stall_ax.plot(
        [r["step"] for r in timed],
        [r.get("seconds") or 0.0 for r in timed],
        marker=".",
        ms=3,
        lw=0.8,
        ls="--",
        label="save total",
    )
    stall_ax.set_ylabel("save time (s)")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()


def _bar_width(saves: list[dict[str, Any]]) -> float:
    """Bars a fraction of the smallest gap between saves wide (1 step with a single save)."""
    steps = sorted(r["step"] for r in saves)
    gaps = [b - a for a, b in itertools.pairwise(steps) if b > a]
    return max(min(gaps) * 0.6, 1.0) if gaps else 1.0
