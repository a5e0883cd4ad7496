"""Known metrics carry their direction: plot, best, prune --keep-best and BestN agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import reckpt
from tests.helpers import trained
from tests.helpers.files import write_eval_results
from tests.helpers.processes import reckpt_cli


@pytest.fixture
def run(tmp_path: Path) -> Path:
    root = tmp_path / "run"
    rows = [(10, 0.30, 0.70, 5.0), (20, 0.20, 0.75, 7.0), (30, 0.40, 0.65, 6.0)]  # step 20: best loss and auc
    for step, *_ in rows:
        reckpt.save_model(str(root / f"model.ckpt-{step}"), *trained(seed=step))
    write_eval_results(root, {s: {"logloss": ll, "auc": a, "ctr_score": c} for s, ll, a, c in rows})
    return root


def test_logloss_is_smaller_is_better_everywhere(run: Path, tmp_path: Path) -> None:
    assert reckpt.best_checkpoint(str(run), metric="logloss")[1] == 20
    out = reckpt_cli("best", str(run), "--metric", "logloss", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["step"] == 20, out.stderr
    plot = reckpt_cli("plot", str(run), "-o", str(tmp_path / "p.png"), "--metric", "logloss", "--json")
    assert plot.returncode == 0 and json.loads(plot.stdout)["best_step"] == 20, plot.stderr
    assert reckpt.BestN(1, "logloss").keep(reckpt.list_checkpoints(str(run)), 0.0) == {20}
    assert reckpt_cli("prune", str(run), "--keep-best", "logloss", "--metric", "logloss").returncode == 0
    assert [c.step for c in reckpt.list_checkpoints(str(run))] == [20, 30]  # best by logloss, newest


def test_an_unknown_metric_needs_a_direction(run: Path) -> None:
    with pytest.raises(ValueError, match="'ctr_score' has no built-in direction"):
        reckpt.best_checkpoint(str(run), metric="ctr_score")
    with pytest.raises(ValueError, match="no built-in direction"):
        reckpt.BestN(1, "ctr_score")
    out = reckpt_cli("best", str(run), "--metric", "ctr_score")
    assert out.returncode != 0 and "--larger-is-better / --smaller-is-better" in out.stderr
    out = reckpt_cli("best", str(run), "--metric", "ctr_score", "--larger-is-better", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["step"] == 20, out.stderr
