"""Which checkpoint is the best one (pure: no I/O).

Best selection (:func:`reckpt.best_checkpoint`, ``reckpt best``) and pruning share these
rules, so the checkpoint ``best_checkpoint`` returns is the one no prune deletes:

- the metric: the configured one (TorchEasyRec's ``best_exporter_metric``); unnamed, the
  only one recorded, else ``auc`` (:func:`resolve_metric_name`);
- its direction: the configured one (``metric_larger_is_better``); unset, by name
  (:func:`default_larger_is_better`: losses and errors are smaller-is-better, AUC and
  accuracy larger; a metric of unknown direction is an error where it is asked for);
- the best step: the best finite value, ties to the older step (:func:`best_step`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "BestRule",
    "find_best",
    "best_step",
    "resolve_metric_name",
    "default_larger_is_better",
    "is_finite_number",
]


def is_finite_number(value: object) -> bool:
    """An int or float (not a bool) that is neither NaN nor infinite."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class BestRule:
    """How pruning tells the best checkpoint, which it never deletes.

    Attributes:
        metric: the eval metric (TorchEasyRec's ``best_exporter_metric``); ``None``: the
            only one recorded, else ``auc``.
        larger_is_better: the metric's direction; ``None``: by its name
            (:func:`default_larger_is_better`).
        required: raise rather than protect nothing when metrics are recorded but the
            best cannot be told (``exporter_type == "best"``: a wrong metric name must not
            let the best go).
    """

    metric: str | None = None
    larger_is_better: bool | None = None
    required: bool = False


_SMALLER_IS_BETTER = ("loss", "logloss", "mse", "mae", "rmse")
_LARGER_IS_BETTER = (
    "auc",
    "gauc",
    "grouped_auc",
    "accuracy",
    "acc",
    "recall",
    "precision",
    "ndcg",
    "mrr",
    "f1",
)


def _named(metric: str, names: tuple[str, ...]) -> bool:
    return any(metric == m or metric.startswith((m + "_", m + "@")) for m in names)


def default_larger_is_better(metric: str) -> bool:
    """A known metric's direction, for when none is configured.

    =====================================================  ================
    metric (``<name>``, a tower's ``<name>_<tower>``,      larger is better
    a cut-off's ``<name>@<k>``)
    =====================================================  ================
    ``auc``, ``gauc``, ``grouped_auc``, ``accuracy``,      yes
    ``recall@k``, ``precision``, ``ndcg``, ``mrr``, ``f1``
    ``loss``, ``logloss``, ``mse``, ``mae``, ``rmse``      no
    =====================================================  ================

    Raises:
        ValueError: the metric is none of these: its direction must be given
            (``metric_larger_is_better``, ``--larger-is-better`` / ``--smaller-is-better``),
            never guessed, or a wrong guess would keep the worst checkpoint as the best.
    """
    if _named(metric, _SMALLER_IS_BETTER):
        return False
    if _named(metric, _LARGER_IS_BETTER):
        return True
    raise ValueError(
        f"metric {metric!r} has no built-in direction (larger is better: {', '.join(_LARGER_IS_BETTER)};"
        f" smaller: {', '.join(_SMALLER_IS_BETTER)}); say which way is better: metric_larger_is_better="
        " / larger_is_better=, or --larger-is-better / --smaller-is-better"
    )


def resolve_metric_name(metric: str | None, available: Iterable[str], source: str) -> str:
    """The metric best selection uses.

    An explicit name must be available. Without one: a single metric is used as is;
    among several, ``auc`` when present; otherwise a ``ValueError`` lists them.
    """
    names = sorted(set(available))
    if metric is not None:
        if metric not in names:
            raise ValueError(
                f"{source}: metric {metric!r} is not recorded; recorded metrics: {names or 'none'}."
                " Pick one of them (best_exporter_metric / --metric)."
            )
        return metric
    if len(names) == 1:
        return names[0]
    if "auc" in names:
        return "auc"
    raise ValueError(
        f"{source}: several metrics are recorded ({', '.join(names)}) and none was named;"
        " set best_exporter_metric (or metric=) to one of them"
    )


def best_step(
    metrics_by_step: Mapping[int, Mapping[str, float]], metric: str, larger_is_better: bool = True
) -> int | None:
    """The step with the best finite ``metric`` (ties: the earliest step), ``None`` if none."""
    scored = [(s, float(m[metric])) for s, m in metrics_by_step.items() if is_finite_number(m.get(metric))]
    if not scored:
        return None
    sign = -1.0 if larger_is_better else 1.0
    return min(scored, key=lambda sv: (sign * sv[1], sv[0]))[0]


def find_best(metrics_by_step: Mapping[int, Mapping[str, float]], rule: BestRule) -> tuple[int, str] | None:
    """``(step, metric)`` of the best step, ``None`` while it is not known.

    Pass the metrics of the steps that may be chosen (pruning: the committed checkpoints).
    The best is known when a step records the metric: the rule's, or unnamed, the only one
    recorded, else ``auc``. It is not known with no metrics at all, with several and none
    of them ``auc``, or with a named metric recorded nowhere.

    Raises:
        ValueError: ``rule.required``, metrics are recorded, and none is the one to use.

    Example:
        >>> m = {1: {"auc": 0.8, "logloss": 0.3}, 2: {"auc": 0.7, "logloss": 0.2}}
        >>> find_best(m, BestRule()), find_best(m, BestRule("logloss"))
        ((1, 'auc'), (2, 'logloss'))
    """
    names = {k for metrics in metrics_by_step.values() for k in metrics}
    if not names:
        return None
    try:
        name = resolve_metric_name(rule.metric, names, "eval metrics of the checkpoints")
    except ValueError:
        if rule.required:
            raise
        return None
    larger = rule.larger_is_better
    if larger is None:
        try:
            larger = default_larger_is_better(name)
        except ValueError:
            if rule.required:
                raise
            return None  # a metric of unknown direction: the best is not known
    step = best_step(metrics_by_step, name, larger)
    return None if step is None else (step, name)
