"""A manager that is never closed finishes its work at interpreter exit (real subprocesses)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from torch import nn

import reckpt
from tests.helpers.processes import run_python

SCRIPT = Path(__file__).with_name("unclosed_manager.py")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    proc = run_python(str(SCRIPT), *args, env={"RANK": "0"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "exiting without close()" in proc.stdout
    return proc


def test_queued_prune_runs_at_exit(tmp_path: Path) -> None:
    for step in range(1, 41):
        reckpt.save_model(str(tmp_path / f"model.ckpt-{step}"), nn.Linear(64, 64))
    proc = _run("prune", str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["model.ckpt-40"], proc.stderr  # no trash, nothing half-done
    assert "was not closed: finishing its pruning" in proc.stderr


def test_async_save_in_flight_commits_at_exit(tmp_path: Path) -> None:
    proc = _run("async", str(tmp_path), "64")
    assert "in flight: 1" in proc.stdout
    assert "was not closed: finishing its async save of step 1" in proc.stderr
    ck = str(tmp_path / "model.ckpt-1")
    assert reckpt.verify(ck).ok  # committed and whole
    assert reckpt.restore_dataloader_state(ck) == {"part:0": 3}
    assert sorted(os.listdir(tmp_path)) == ["model.ckpt-1"]  # no staging directory, no lock file
