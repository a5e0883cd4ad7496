"""Pruning: TorchEasyRec's CheckpointManager cases, and "the best is never pruned while it is known"."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from torch import nn

import reckpt
from tests.helpers.files import write_eval_results
from tests.helpers.processes import reckpt_cli


def _remaining(root: Path) -> list[int]:
    return sorted(int(p.name.rsplit("-", 1)[1]) for p in root.iterdir() if p.name.startswith("model.ckpt-"))


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """model.ckpt-{0,10,20,30}: real committed checkpoints (TorchEasyRec's test fakes them)."""
    for step in (0, 10, 20, 30):
        reckpt.save_model(str(tmp_path / f"model.ckpt-{step}"), nn.Linear(1, 1))
    return tmp_path


@pytest.fixture
def rank(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("RANK", "0")
    yield


BEST_AUC = SimpleNamespace(exporter_type="best", best_exporter_metric="auc", metric_larger_is_better=True)


@pytest.mark.parametrize(
    ("keep", "with_results", "export_config", "left"),
    [
        pytest.param(0, False, None, [0, 10, 20, 30], id="keep all"),
        pytest.param(2, False, None, [20, 30], id="newest 2"),
        pytest.param(2, True, BEST_AUC, [10, 20, 30], id="newest 2 + best (exporter best)"),
        pytest.param(2, True, None, [10, 20, 30], id="newest 2 + best (no export config)"),
        pytest.param(10, False, None, [0, 10, 20, 30], id="keep more than there are"),
    ],
)
def test_prune(
    run: Path, rank: None, keep: int, with_results: bool, export_config: Any, left: list[int]
) -> None:
    if with_results:  # step 10 is the best, outside the newest 2
        write_eval_results(run, {0: {"auc": 0.5}, 10: {"auc": 0.99}, 20: {"auc": 0.6}, 30: {"auc": 0.7}})
    mgr = reckpt.CheckpointManager(str(run), keep_checkpoint_max=keep, export_config=export_config)
    mgr.prune()
    mgr.close()
    assert _remaining(run) == left


def test_prune_on_a_non_zero_rank_deletes_nothing(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")  # no process group: the launcher's RANK says who is rank 0
    mgr = reckpt.CheckpointManager(str(run), keep_checkpoint_max=2)
    mgr.prune()
    mgr.close()
    assert _remaining(run) == [0, 10, 20, 30]


def test_protect_then_unprotect(run: Path, rank: None) -> None:
    mgr = reckpt.CheckpointManager(str(run), keep_checkpoint_max=2)
    mgr.protect_checkpoint(str(run / "model.ckpt-10"))
    mgr.prune()
    mgr.close()
    assert _remaining(run) == [10, 20, 30]
    mgr.unprotect_checkpoint(str(run / "model.ckpt-10"))
    mgr.prune()
    mgr.close()
    assert _remaining(run) == [20, 30]


def test_two_requests_coalesce(run: Path, rank: None) -> None:
    mgr = reckpt.CheckpointManager(str(run), keep_checkpoint_max=2)
    mgr.prune()
    mgr.prune()
    mgr.close()
    assert _remaining(run) == [20, 30]


def test_finalizer_drains_without_close(run: Path, rank: None) -> None:
    """TorchEasyRec's case: close() never reached; running the finalizer (as exit does) drains."""
    mgr = reckpt.CheckpointManager(str(run), keep_checkpoint_max=2)
    mgr.prune()
    assert mgr._finalizer.alive
    mgr._finalizer()
    assert _remaining(run) == [20, 30]
    assert mgr._prune_worker is not None and not mgr._prune_worker.is_alive()
    assert not mgr._finalizer.alive
    mgr.prune()  # still usable: a new worker, and a new finalizer for exit
    assert mgr._finalizer.alive
    mgr.close()


def test_manager_discovery_matches_the_functions(tmp_path: Path) -> None:
    for step in (0, 10, 20):
        reckpt.save_model(str(tmp_path / f"model.ckpt-{step}"), nn.Linear(1, 1))
    write_eval_results(tmp_path, {0: {"auc": 0.6}, 10: {"auc": 0.7}, 20: {"auc": 0.5}})
    mgr = reckpt.CheckpointManager(str(tmp_path), export_config=BEST_AUC)
    assert mgr.latest_checkpoint() == reckpt.latest_checkpoint(str(tmp_path))
    assert mgr.best_checkpoint() == reckpt.best_checkpoint(str(tmp_path), BEST_AUC)
    assert mgr.best_checkpoint()[1] == 10


@pytest.mark.parametrize(
    ("export_config", "left"),
    [
        pytest.param(None, [10, 30], id="auc by default"),
        pytest.param(SimpleNamespace(best_exporter_metric="logloss"), [20, 30], id="a loss: smallest"),
        pytest.param(
            SimpleNamespace(best_exporter_metric="logloss", metric_larger_is_better=True),
            [0, 30],
            id="configured",
        ),
        pytest.param(SimpleNamespace(best_exporter_metric="ndcg"), [30], id="named, not recorded: not known"),
    ],
)
def test_keep_one_never_deletes_the_best(run: Path, rank: None, export_config: Any, left: list[int]) -> None:
    write_eval_results(
        run, {s: {"auc": a, "logloss": ll} for s, a, ll in ((0, 0.5, 0.9), (10, 0.9, 0.4), (20, 0.7, 0.2))}
    )
    mgr = reckpt.CheckpointManager(str(run), keep_checkpoint_max=1, export_config=export_config)
    mgr.prune()
    mgr.close()
    assert _remaining(run) == left
    if export_config is None:
        assert mgr.best_checkpoint() == (str(run / "model.ckpt-10"), 10)  # what best() returns survives


def test_exporter_best_that_cannot_be_told_stops_pruning(run: Path, rank: None) -> None:
    write_eval_results(run, {0: {"gauc": 0.5, "logloss": 0.3}, 10: {"gauc": 0.9, "logloss": 0.2}})
    cfg = SimpleNamespace(exporter_type="best")  # several metrics, none named, no auc
    mgr = reckpt.CheckpointManager(str(run), keep_checkpoint_max=1, export_config=cfg)
    mgr.prune()
    mgr.close()
    assert _remaining(run) == [0, 10, 20, 30]  # nothing deleted rather than maybe the best
    mgr = reckpt.CheckpointManager(str(run), keep_checkpoint_max=1)  # no demand: policies decide
    mgr.prune()
    mgr.close()
    assert _remaining(run) == [30]


def test_saving_run_keeps_its_best(tmp_path: Path) -> None:
    """keep_checkpoint_max=1 with record_eval: the best step survives the whole run."""
    m = nn.Linear(2, 1)
    with reckpt.CheckpointManager(str(tmp_path), keep_checkpoint_max=1) as mgr:
        for step, auc in ((1, 0.6), (2, 0.9), (3, 0.7), (4, 0.8)):
            mgr.save(step, m)
            mgr.record_eval(step, {"auc": auc, "logloss": 1 - auc})
    assert [c.step for c in reckpt.list_checkpoints(str(tmp_path))] == [2, 4]


def test_cli_prune_keeps_the_best(run: Path) -> None:
    write_eval_results(
        run, {s: {"auc": a, "logloss": ll} for s, a, ll in ((0, 0.5, 0.9), (10, 0.9, 0.4), (20, 0.7, 0.2))}
    )
    proc = reckpt_cli("prune", str(run), "--keep-last", "1", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["would_delete"] == [str(run / "model.ckpt-0"), str(run / "model.ckpt-20")]
    assert doc["best"] == {"step": 10, "metric": "auc"}
    proc = reckpt_cli("prune", str(run), "--keep-last", "1", "--metric", "ndcg")
    assert proc.returncode == 2 and "'ndcg' is not recorded" in proc.stderr
    assert _remaining(run) == [0, 10, 20, 30]
    proc = reckpt_cli("prune", str(run), "--keep-last", "1", "--metric", "logloss")
    assert proc.returncode == 0, proc.stderr
    assert "kept the best checkpoint by logloss: step 20" in proc.stdout
    assert _remaining(run) == [20, 30]
    best = reckpt_cli("best", str(run), "--metric", "logloss").stdout.strip()
    assert best == str(run / "model.ckpt-20")  # a loss is smaller-is-better without a flag
    assert os.path.isdir(best)
