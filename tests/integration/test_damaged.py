"""Known-bad never outranks good: a checkpoint that failed verification is marked damaged
(its files untouched), is never latest or best, counts toward no retention, and goes first."""

from __future__ import annotations

from pathlib import Path

import reckpt
from tests.helpers import flip_bit, fresh, trained
from tests.helpers.files import write_eval_results
from tests.helpers.processes import reckpt_cli


def _run(root: Path) -> None:
    for step in (10, 20, 30):
        reckpt.save_model(str(root / f"model.ckpt-{step}"), *trained(seed=step))
    write_eval_results(root, {10: {"auc": 0.6}, 20: {"auc": 0.7}, 30: {"auc": 0.9}})


def test_a_damaged_newest_checkpoint_is_shown_skipped_and_pruned_first(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _run(run)
    flip_bit(run / "model.ckpt-30")
    out = reckpt_cli("verify", str(run))
    assert out.returncode != 0
    states = {c.step: c.state for c in reckpt.list_checkpoints(str(run))}
    assert states == {10: "committed", 20: "committed", 30: "damaged"}
    assert "damaged" in reckpt_cli("ls", str(run)).stdout
    assert reckpt.latest_checkpoint(str(run)) == (str(run / "model.ckpt-20"), 20)
    assert reckpt.best_checkpoint(str(run))[1] == 20  # 30 has the best auc, but is damaged
    assert reckpt_cli("prune", str(run), "--keep-last", "2").returncode == 0
    assert [c.step for c in reckpt.list_checkpoints(str(run))] == [10, 20]  # both good ones stay


def test_resume_marks_a_damaged_checkpoint_and_a_new_save_replaces_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _run(run)
    flip_bit(run / "model.ckpt-30")
    with reckpt.CheckpointManager(str(run), keep_checkpoint_max=2) as mgr:
        m, o = fresh()
        info = mgr.restore_latest(m, o)
        assert info is not None and info.step == 20
        assert {c.step: c.state for c in mgr.list_checkpoints()}[30] == "damaged"
        mgr.save(30, *trained(seed=31))  # the redone save of the damaged step
    states = {c.step: c.state for c in reckpt.list_checkpoints(str(run))}
    assert states == {20: "committed", 30: "committed"}
    assert reckpt.verify(str(run / "model.ckpt-30")).ok
    # a checkpoint that verifies again loses the mark
    flip_bit(run / "model.ckpt-20")
    reckpt_cli("verify", str(run / "model.ckpt-20"))
    assert {c.step: c.state for c in reckpt.list_checkpoints(str(run))}[20] == "damaged"
    flip_bit(run / "model.ckpt-20")  # flipped back
    assert reckpt_cli("verify", str(run / "model.ckpt-20")).returncode == 0
    assert {c.step: c.state for c in reckpt.list_checkpoints(str(run))}[20] == "committed"


def test_a_new_run_replaces_a_step_marked_damaged(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _run(run)
    flip_bit(run / "model.ckpt-30")
    assert reckpt_cli("verify", str(run)).returncode != 0
    with reckpt.CheckpointManager(str(run)) as mgr:  # knows nothing of the damage but the mark
        mgr.save(30, *trained(seed=32))
    assert {c.step: c.state for c in reckpt.list_checkpoints(str(run))}[30] == "committed"
