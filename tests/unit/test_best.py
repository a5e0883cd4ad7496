"""Telling the best checkpoint (reckpt.best): metric, direction, and when it is not known."""

from __future__ import annotations

import pytest

from reckpt.best import BestRule, default_larger_is_better, find_best

TWO = {1: {"auc": 0.8, "logloss": 0.3}, 2: {"auc": 0.7, "logloss": 0.2}, 3: {"auc": 0.75, "logloss": 0.4}}


@pytest.mark.parametrize(
    ("metric", "larger"),
    [
        ("auc", True),
        ("grouped_auc", True),
        ("auc_ctr", True),
        ("recall", True),
        ("gauc", True),
        ("accuracy", True),
        ("recall@10", True),
        ("logloss", False),
        ("logloss_ctr", False),
        ("loss", False),
        ("mse", False),
        ("rmse", False),
    ],
)
def test_default_direction(metric: str, larger: bool) -> None:
    assert default_larger_is_better(metric) is larger


@pytest.mark.parametrize("metric", ["lossy_metric", "ctr", "my_score"])
def test_a_metric_of_unknown_direction_is_an_error(metric: str) -> None:
    """Only whole names (or a tower's <name>_<tower>, a cut-off's <name>@k) count; a guess could
    keep the worst checkpoint as the best."""
    with pytest.raises(ValueError, match=f"metric '{metric}' has no built-in direction"):
        default_larger_is_better(metric)
    assert find_best({1: {metric: 0.1}, 2: {metric: 0.2}}, BestRule()) is None  # not known: not guessed
    assert find_best({1: {metric: 0.1}, 2: {metric: 0.2}}, BestRule(larger_is_better=False)) == (1, metric)
    with pytest.raises(ValueError, match="no built-in direction"):
        find_best({1: {metric: 0.1}}, BestRule(metric, required=True))


@pytest.mark.parametrize(
    ("metrics", "rule", "want"),
    [
        pytest.param(TWO, BestRule(), (1, "auc"), id="unnamed: auc among several"),
        pytest.param(TWO, BestRule("logloss"), (2, "logloss"), id="a loss: smallest"),
        pytest.param(TWO, BestRule("logloss", larger_is_better=True), (3, "logloss"), id="configured"),
        pytest.param(TWO, BestRule("auc", larger_is_better=False), (2, "auc"), id="configured smaller"),
        pytest.param({5: {"logloss": 0.2}, 6: {"logloss": 0.1}}, BestRule(), (6, "logloss"), id="single"),
        pytest.param({5: {"auc": 0.9}, 6: {"auc": 0.9}}, BestRule(), (5, "auc"), id="tie: the older"),
        pytest.param({5: {}, 6: {}}, BestRule(required=True), None, id="no metrics: not known"),
        pytest.param({5: {"gauc": 0.1, "mse": 1.0}}, BestRule(), None, id="ambiguous: not known"),
        pytest.param(TWO, BestRule("ndcg"), None, id="named but not recorded: not known"),
        pytest.param({5: {"auc": float("nan")}}, BestRule(required=True), None, id="no finite value"),
    ],
)
def test_find_best(metrics, rule: BestRule, want) -> None:
    assert find_best(metrics, rule) == want


def test_find_best_required_raises_naming_the_metrics() -> None:
    with pytest.raises(ValueError, match=r"several metrics are recorded \(gauc, mse\)"):
        find_best({5: {"gauc": 0.1, "mse": 1.0}}, BestRule(required=True))
    with pytest.raises(ValueError, match=r"'ndcg' is not recorded; recorded metrics: \['auc', 'logloss'\]"):
        find_best(TWO, BestRule("ndcg", required=True))
