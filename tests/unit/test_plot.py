"""`reckpt plot`: the metric plot alone, or four panels with the trainer's training log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reckpt.cli._plot import TRAIN_LOG, plot_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def eval_results(root: Path, rows: list[tuple[int, float]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"global_step": s, "auc": a, "logloss": 1 - a}) for s, a in rows]
    (root / "train_eval_result_v2.txt").write_text("\n".join(lines) + "\n")


def train_log(root: Path, records: list[dict[str, object]], tail: str = "") -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / TRAIN_LOG).write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def save(step: int, nbytes: int, stall: float, kind: str = "full") -> dict[str, object]:
    return {
        "step": step,
        "event": "save",
        "path": f"run/model.{'ckpt' if kind == 'full' else 'delta'}-{step}",
        "kind": kind,
        "bytes": nbytes,
        "stall_s": stall,
        "seconds": stall * 2,
        "gbps": 0.5,
        "tier": "disk",
        "async": True,
    }


def test_without_a_training_log_the_plot_and_its_keys_are_todays(tmp_path: Path) -> None:
    """(No checkpoint: the best step is -1, as ``best_checkpoint`` answers.)"""
    root = tmp_path / "run"
    eval_results(root, [(10, 0.7), (20, 0.8), (30, 0.75)])
    out = tmp_path / "m.png"
    doc = plot_metrics(str(root), str(out))
    assert doc == {"metric": "auc", "steps": [10, 20, 30], "values": [0.7, 0.8, 0.75], "checkpoints": [],
                   "best_step": -1}  # fmt: skip
    assert out.read_bytes()[:8] == PNG


def test_with_a_training_log_loss_sizes_and_stalls_are_added(tmp_path: Path) -> None:
    """Later lines for a step win (a resumed run redoes steps); a line cut by a kill is skipped."""
    root = tmp_path / "run"
    eval_results(root, [(20, 0.7), (40, 0.8)])
    records: list[dict[str, object]] = [
        {"step": s, "loss": (70 - s) / 100, "examples_per_s": 1e4} for s in (0, 10, 20, 30)
    ]
    records += [save(20, 2_000_000, 0.01), {"step": 20, "event": "eval", "auc": 0.7}]
    records += [{"step": 30, "loss": 0.2}, save(40, 300_000, 0.02, "delta")]  # step 30 again: it wins
    records += [{"step": 40, "event": "restore", "path": "run/model.delta-40", "bytes": 9, "seconds": 1}]
    train_log(root, records, tail='{"step": 50, "lo')
    out = tmp_path / "m.png"
    doc = plot_metrics(str(root), str(out), metric="auc")
    assert {k: doc[k] for k in ("metric", "steps", "values")} == {
        "metric": "auc", "steps": [20, 40], "values": [0.7, 0.8],
    }  # fmt: skip
    assert doc["train_log"] == f"{root}/{TRAIN_LOG}"
    assert doc["loss"] == {"steps": [0, 10, 20, 30], "values": [0.7, 0.6, 0.5, 0.2]}
    assert [(s["step"], s["bytes"], s["kind"], s["stall_s"]) for s in doc["saves"]] == [
        (20, 2_000_000, "full", 0.01),
        (40, 300_000, "delta", 0.02),
    ]
    assert set(doc["saves"][0]) == {"step", "bytes", "stall_s", "seconds", "gbps", "tier", "kind"}
    assert out.read_bytes()[:8] == PNG


def test_a_training_log_without_evals_still_plots(tmp_path: Path) -> None:
    """A run killed before its first eval: loss and saves, the metric panel says so."""
    root = tmp_path / "run"
    train_log(root, [{"step": 0, "loss": 0.69}, {"step": 5, "loss": 0.6}, save(5, 1000, 0.1)])
    doc = plot_metrics(str(root), str(tmp_path / "m.png"))
    assert doc["metric"] is None and doc["steps"] == [] and doc["best_step"] == -1
    assert doc["loss"]["steps"] == [0, 5] and len(doc["saves"]) == 1


def test_nothing_to_plot_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    with pytest.raises(ValueError, match="no eval metrics recorded to plot"):
        plot_metrics(str(tmp_path / "run"), str(tmp_path / "m.png"))


def test_the_trainer_writes_the_log_plot_reads() -> None:
    from reckpt.trainer.log import TRAIN_LOG as written

    assert written == TRAIN_LOG
