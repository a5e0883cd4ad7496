"""``reckpt plot``: eval metrics against step, committed checkpoints marked, the best highlighted."""

from __future__ import annotations

from typing import Any

from reckpt.format.eval_results import TRAIN_EVAL_RESULT_FILENAME
from reckpt.lifecycle.discovery import best_checkpoint, scan
from reckpt.policy import resolve_metric_name
from reckpt.storage.core import Storage

__all__ = ["plot_metrics"]


def plot_metrics(
    model_dir: str,
    output: str,
    *,
    metric: str | None = None,
    larger_is_better: bool | None = None,
    eval_result_filename: str = TRAIN_EVAL_RESULT_FILENAME,
) -> dict[str, Any]:
    """Draw the metric curve to a PNG; returns the plotted data (steps, values, checkpoints, best).

    The best point follows the metric's direction: ``larger_is_better``, else the metric's
    built-in one (losses smaller, AUC larger; :func:`reckpt.best.default_larger_is_better`).

    Raises:
        ValueError: no metrics are recorded, the metric cannot be chosen (listed in the
            message), or it has no built-in direction and none was given.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = model_dir.rstrip("/")
    infos, by_step = scan(root, eval_result_filename=eval_result_filename, with_size=False)
    names = {k for m in by_step.values() for k in m}
    if not names:
        raise ValueError(f"{Storage.join(root, eval_result_filename)}: no eval metrics recorded to plot")
    name = resolve_metric_name(metric, names, Storage.join(root, eval_result_filename))
    steps = sorted(s for s, m in by_step.items() if name in m)
    values = [by_step[s][name] for s in steps]
    committed = sorted(c.step for c in infos if c.committed)
    _, best = best_checkpoint(
        root, metric=name, larger_is_better=larger_is_better, eval_result_filename=eval_result_filename
    )

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
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
    ax.set_xlabel("step")
    ax.set_ylabel(name)
    ax.set_title(root)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)
    return {"metric": name, "steps": steps, "values": values, "checkpoints": committed, "best_step": best}
