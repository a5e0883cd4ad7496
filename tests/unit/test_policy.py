"""Retention and save-decision policies: pure tables, no I/O."""

from __future__ import annotations

import pytest

from reckpt.policy import (
    BestN,
    BestRule,
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


# By auc (larger is better) the best committed checkpoint is step 2: every prune keeps it.
@pytest.mark.parametrize(
    ("policies", "protected", "deleted"),
    [
        ([], (), []),
        ([LatestN(2)], (), [1, 10]),
        ([LatestN(1)], (), [1, 10, 20]),
        ([LatestN(1), BestN(1, "auc")], (), [1, 10, 20]),
        ([LatestN(1), BestN(2, "auc")], (), [1, 20]),
        ([BestN(1, "auc", larger_is_better=False)], (), [1, 10]),  # newest and best always kept
        ([EveryNSteps(10)], (), [1]),
        ([EveryNSeconds(3600)], (), [20]),
        ([PinnedSteps(frozenset({2}))], (1,), [10, 20]),
        ([LatestN(1)], (10,), [1, 20]),
    ],
)
def test_steps_to_delete(policies, protected, deleted) -> None:
    assert steps_to_delete(CKS, policies, now=9999.0, protected=protected) == deleted


@pytest.mark.parametrize(
    ("best", "deleted"),
    [
        (BestRule(), [1, 10, 20]),  # auc, larger is better: step 2
        (BestRule("auc", larger_is_better=False), [1, 2, 10]),  # lowest auc: step 20
        (BestRule("logloss"), [1, 2, 20]),  # a loss: smaller is better, step 10
        (BestRule("logloss", larger_is_better=True), [1, 2, 10]),
        (BestRule("ndcg"), [1, 2, 10, 20]),  # recorded nowhere: the best is not known
    ],
)
def test_steps_to_delete_never_deletes_the_best(best, deleted) -> None:
    cks = [
        CheckpointInfo(s, f"m/model.ckpt-{s}", metrics={"auc": a, "logloss": ll})
        for s, a, ll in ((1, 0.7, 0.4), (2, 0.8, 0.5), (10, 0.75, 0.3), (20, 0.6, 0.6), (30, 0.65, 0.45))
    ]
    assert steps_to_delete(cks, [LatestN(1)], now=0.0, best=best) == deleted


def test_best_that_cannot_be_told_deletes_nothing_when_required() -> None:
    cks = [CheckpointInfo(s, f"m/model.ckpt-{s}", metrics={"gauc": 0.5, "logloss": 0.3}) for s in (1, 2, 3)]
    # Several metrics and none of them auc: not known, so only the policies decide...
    assert steps_to_delete(cks, [LatestN(1)], now=0.0) == [1, 2]
    # ...unless the export config demands a best (exporter_type "best"): then nothing goes.
    with pytest.raises(ValueError, match="gauc, logloss"):
        steps_to_delete(cks, [LatestN(1)], now=0.0, best=BestRule(required=True))
    with pytest.raises(ValueError, match="'auc' is not recorded"):
        steps_to_delete(cks, [LatestN(1)], now=0.0, best=BestRule("auc", required=True))


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


# TorchEasyRec's cases (compat §11, #27): (event time, last save's, interval, targets) -> save?
@pytest.mark.parametrize(
    ("ts", "last", "interval", "targets", "want"),
    [
        pytest.param(1000, None, 600, [500], False, id="no reference yet: only seeds"),
        pytest.param(3600, 3599, 3600, [], True, id="interval boundary crossed"),
        pytest.param(3500, 3000, 3600, [], False, id="same interval bucket"),
        pytest.param(10000, 0, 0, [], False, id="interval off"),
        pytest.param(1500, 1000, 0, [1500], True, id="target reached exactly"),
        pytest.param(1600, 1000, 0, [1500], True, id="target passed"),
        pytest.param(1400, 1000, 0, [1500], False, id="target not reached"),
        pytest.param(2000, 1500, 0, [1500], False, id="target never fires twice"),
        pytest.param(1600, 1000, 0, [900, 1500, 5000], True, id="one of several targets"),
        pytest.param(1600, 1000, 3600, [1500], True, id="target inside one interval bucket"),
        pytest.param(7199.5, 3600.0, 3600, [], False, id="float times, same bucket"),
        pytest.param(7200.0, 7199.5, 3600, [], True, id="float times, next bucket"),
    ],
)
def test_should_save_on_timestamp(ts, last, interval, targets, want) -> None:
    assert should_save_on_timestamp(ts, last, interval, targets) is want


# TorchEasyRec's cases (compat §11, #28): per-rank event times and quorum -> reconciled time.
@pytest.mark.parametrize(
    ("values", "q", "want"),
    [
        pytest.param([], 0.5, None, id="no ranks"),
        pytest.param([42.0], 0.5, 42.0, id="one rank"),
        pytest.param([5.0, 5.0, 5.0], 0.5, 5.0, id="all equal"),
        pytest.param([10.0, 20.0, 30.0, 40.0], 1.0, 10.0, id="full quorum: the minimum"),
        pytest.param([10.0, 20.0, 30.0, 40.0], 0.01, 40.0, id="tiny quorum: the maximum"),
        pytest.param([10.0, 20.0, 30.0, 40.0], 0.5, 30.0, id="half of four: 2nd largest"),
        pytest.param([10.0, 30.0, 20.0], 0.5, 20.0, id="half of three: the median"),
        pytest.param([100.0, 101.0, 1e18], 0.5, 101.0, id="one far-off value ignored"),
        pytest.param([100.0, 101.0, -1.0], 0.5, 100.0, id="a rank without time, quorum met"),
        pytest.param([100.0, -1.0, -1.0], 0.5, -1.0, id="quorum not met: negative"),
        pytest.param([float(v) for v in range(1, 26)], 0.28, 19.0, id="0.28 * 25 counts as 7, not 8"),
    ],
)
def test_quorum_event_time(values, q, want) -> None:
    assert quorum_event_time(values, q) == want


def test_retention_counts_only_good_checkpoints() -> None:
    """A damaged checkpoint counts toward no retention and goes first."""
    cks = [
        CheckpointInfo(10, "m/model.ckpt-10"),
        CheckpointInfo(20, "m/model.ckpt-20"),
        CheckpointInfo(30, "m/model.ckpt-30", state="damaged"),
    ]
    assert steps_to_delete(cks, [LatestN(2)], now=0.0) == [30]
    assert steps_to_delete(cks, [LatestN(2)], now=0.0, protected=[30]) == []
    assert steps_to_delete([cks[2]], [LatestN(1)], now=0.0) == [30]


def test_next_save_kind_rules() -> None:
    from reckpt.policy import IncrementalPolicy, next_save_kind

    p = IncrementalPolicy(full_every=3, max_delta_fraction=0.2)
    kw = {"delta_bytes": 10, "full_bytes": 100}
    assert next_save_kind(p, has_parent=False, deltas_since_full=0, **kw)[0] == "full"
    assert next_save_kind(p, has_parent=True, deltas_since_full=2, **kw)[0] == "delta"
    assert next_save_kind(p, has_parent=True, deltas_since_full=3, **kw)[0] == "full"
    big = {"delta_bytes": 21, "full_bytes": 100}
    assert next_save_kind(p, has_parent=True, deltas_since_full=0, **big)[0] == "full"
    with pytest.raises(ValueError, match="full_every must be >= 1"):
        IncrementalPolicy(full_every=0)
