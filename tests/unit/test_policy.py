"""Retention and save-decision policies: pure tables, no I/O."""

from __future__ import annotations

import pytest

from reckpt.policy import (
    BestN,
    CheckpointInfo,
    EveryNSeconds,
    EveryNSteps,
    LatestN,
    PinnedSteps,
    SaveDecision,
    best_step,
    quorum_event_time,
    resolve_metric_name,
    should_save,
    should_save_on_timestamp,
    steps_to_delete,
)


def ck(
    step: int, auc: float | None = None, t: float | None = None, state: str = "committed"
) -> CheckpointInfo:
    return CheckpointInfo(step, f"m/model.ckpt-{step}", state, t, None, {} if auc is None else {"auc": auc})


CKS = [ck(1, 0.70, 0), ck(2, 0.80, 1000), ck(10, 0.75, 3700), ck(20, 0.60, 3800), ck(30, None, 7300)]


@pytest.mark.parametrize(
    ("policies", "protected", "deleted"),
    [
        ([], (), []),
        ([LatestN(2)], (), [1, 2, 10]),
        ([LatestN(1)], (), [1, 2, 10, 20]),
        ([LatestN(1), BestN(1, "auc")], (), [1, 10, 20]),
        ([LatestN(1), BestN(2, "auc")], (), [1, 20]),
        ([BestN(1, "auc", larger_is_better=False)], (), [1, 2, 10]),  # newest always kept
        ([EveryNSteps(10)], (), [1, 2]),
        ([EveryNSeconds(3600)], (), [2, 20]),
        ([PinnedSteps(frozenset({2}))], (1,), [10, 20]),
        ([LatestN(1)], (10,), [1, 2, 20]),
    ],
)
def test_steps_to_delete(policies, protected, deleted) -> None:
    assert steps_to_delete(CKS, policies, now=9999.0, protected=protected) == deleted


def test_uncommitted_never_counted_nor_deleted() -> None:
    cks = [ck(1), ck(2), ck(3, state="incomplete")]
    # The incomplete newest does not count as "newest": step 2 is kept.
    assert steps_to_delete(cks, [LatestN(1)], now=0) == [1]


def test_numeric_not_string_order() -> None:
    cks = [ck(9), ck(10), ck(100)]
    assert steps_to_delete(cks, [LatestN(2)], now=0) == [9]


def test_bad_policy_arguments() -> None:
    with pytest.raises(ValueError):
        LatestN(0)
    with pytest.raises(ValueError):
        BestN(0, "auc")
    with pytest.raises(ValueError):
        SaveDecision(save_steps=-1)


@pytest.mark.parametrize(
    ("metric", "available", "want"),
    [
        (None, ["auc"], "auc"),
        (None, ["logloss"], "logloss"),
        (None, ["auc", "logloss"], "auc"),
        ("logloss", ["auc", "logloss"], "logloss"),
    ],
)
def test_resolve_metric_name(metric, available, want) -> None:
    assert resolve_metric_name(metric, available, "f") == want


def test_resolve_metric_name_errors_list_metrics() -> None:
    with pytest.raises(ValueError, match="gauc, logloss"):
        resolve_metric_name(None, ["logloss", "gauc"], "f")
    with pytest.raises(ValueError, match=r"'ndcg' is not recorded.*\['auc'\]"):
        resolve_metric_name("ndcg", ["auc"], "f")


def test_best_step_tzrec_vector() -> None:
    """TorchEasyRec's test: larger grouped_auc -> step 10; smaller -> step 0; ties -> earliest."""
    m = {
        0: {"auc": 0.633, "grouped_auc": 0.565},
        10: {"auc": 0.632, "grouped_auc": 0.570},
        20: {"auc": 0.631, "grouped_auc": 0.567},
    }
    assert best_step(m, "grouped_auc", True) == 10
    assert best_step(m, "grouped_auc", False) == 0
    assert best_step({5: {"a": 1.0}, 3: {"a": 1.0}}, "a") == 3
    assert best_step({1: {"a": float("nan")}}, "a") is None


@pytest.mark.parametrize(
    ("decision", "step", "epoch", "final", "elapsed", "want"),
    [
        (SaveDecision(), 10, None, False, 0, False),
        (SaveDecision(), 10, None, True, 0, True),
        (SaveDecision(save_steps=10), 10, None, False, 0, True),
        (SaveDecision(save_steps=10), 5, None, False, 0, False),
        (SaveDecision(save_steps=10), 0, None, False, 0, False),
        (SaveDecision(save_epochs=2), 7, 1, False, 0, True),
        (SaveDecision(save_epochs=2), 7, 0, False, 0, False),
        (SaveDecision(save_interval_s=60), 3, None, False, 61, True),
        (SaveDecision(save_interval_s=60), 3, None, False, 30, False),
    ],
)
def test_should_save(decision, step, epoch, final, elapsed, want) -> None:
    assert (
        should_save(
            decision, step=step, epoch=epoch, final=final, now=1000.0 + elapsed, last_save_time=1000.0
        )
        is want
    )


@pytest.mark.parametrize(
    ("ts", "last", "interval", "targets", "want"),
    [
        (3600, None, 3600, (), False),
        (3600, 3599, 3600, (), True),
        (3700, 3650, 3600, (), False),
        (10, 5, 0, (), False),
        (100, 50, 0, (100,), True),
        (150, 50, 0, (100,), True),
        (90, 50, 0, (100,), False),
        (150, 120, 0, (100,), False),
    ],
)
def test_should_save_on_timestamp(ts, last, interval, targets, want) -> None:
    assert should_save_on_timestamp(ts, last, interval, targets) is want


@pytest.mark.parametrize(
    ("values", "q", "want"),
    [
        ([], 0.5, None),
        ([5.0], 0.5, 5.0),
        ([1.0, 2.0, 3.0], 1.0, 1.0),
        ([1.0, 2.0, 3.0], 0.01, 3.0),
        ([1.0, 2.0, 3.0, 4.0], 0.5, 3.0),
        ([100, 101, -1], 0.5, 100),
        ([100, -1, -1], 0.5, -1),
    ],
)
def test_quorum_event_time(values, q, want) -> None:
    assert quorum_event_time(values, q) == want
