"""Preemption and a second job: a library user's loop saves on SIGTERM and exits 0; a second
manager in the same model_dir stops when it starts, not at its first save."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

import reckpt
from reckpt.commit.writer_lock import ModelDirLockedError
from tests.helpers import trained
from tests.helpers.paths import REPO
from tests.helpers.processes import child_env, run_python

_LOOP = """
import sys, time
import reckpt
from tests.helpers import trained
model, opt = trained()
mgr = reckpt.CheckpointManager(sys.argv[1], save_steps=1000)
mgr.start()
with reckpt.Preemption() as preemption:
    for step in range(10**9):
        time.sleep(0.01)  # a training step
        if step == 5:
            print("running", flush=True)
        if preemption.requested():
            mgr.save(step, model, opt)
            print(f"saved {step}", flush=True)
            break
mgr.close()
"""


def test_sigterm_saves_and_exits_0_with_the_library(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", _LOOP, str(run)], env=child_env(), stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "running"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    step = int(out.split()[-1])
    assert reckpt.latest_checkpoint(str(run)) == (str(run / f"model.ckpt-{step}"), step)
    assert [p.name for p in run.iterdir() if p.name.startswith(".reckpt-")] == []  # lock released


def test_a_second_job_stops_when_it_starts(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    first = reckpt.CheckpointManager(run)
    first.start()
    second = reckpt.CheckpointManager(run)
    with pytest.raises(ModelDirLockedError):
        second.start()
    second.close()
    first.save(1, *trained())
    first.close()
    third = reckpt.CheckpointManager(run)
    third.start()  # free again once the first job closed
    third.close()


_NO_CLOSE = """
import sys, torch, reckpt
model = torch.nn.Linear(256, 256)
opt = torch.optim.Adam(model.parameters())
mgr = reckpt.CheckpointManager(sys.argv[1], save_steps=10, async_save=True, keep_checkpoint_max=2)
for step in range(1, 41):
    model(torch.randn(8, 256)).sum().backward(); opt.step(); opt.zero_grad()
    mgr.maybe_save(step, model, opt)
mgr.maybe_save(40, model, opt, final=True)
"""


def test_async_saves_without_close_exit_cleanly(tmp_path: Path) -> None:
    """A Linear(256, 256) saved every 10 steps asynchronously, a final save, and no close(): the
    interpreter exits 0 (it used to abort: 'terminate called without an active exception'), the
    final checkpoint is committed, retention ran, and nothing is left behind, loudly."""
    run = tmp_path / "run"
    out = run_python("-c", _NO_CLOSE, str(run), cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "was not closed: finishing its async save of step 40" in out.stderr
    assert sorted(p.name for p in run.iterdir()) == ["model.ckpt-30", "model.ckpt-40"]
    assert reckpt.verify(str(run / "model.ckpt-40")).ok
