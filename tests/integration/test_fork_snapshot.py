"""Fork snapshots of async saves: frozen state, every backend a child can reach, failures of the child."""

from __future__ import annotations

import os
import signal

import pytest
import torch

import reckpt
from reckpt.errors import ConfigError, SnapshotProcessError
from reckpt.restore.inspection import read_part
from reckpt.save.engine import collect_parts, save_parts
from reckpt.save.fork_snapshot import ForkSnapshot
from reckpt.storage.core import storage_for
from tests.helpers import fresh, state_dicts_equal, trained


def _no_children_left(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def test_fork_snapshot_holds_the_state_as_it_was(shared_root: str) -> None:
    root = shared_root
    m, o = trained()
    want = {k: v.clone() for k, v in m.state_dict().items()}
    want_opt = {k: v.clone() for k, v in o.state_dict()["state"][0].items()}
    mgr = reckpt.CheckpointManager(root, async_save=True, async_snapshot="fork")
    path = mgr.save(3, m, o)
    with torch.no_grad():  # training rewrites every page at once
        for p in m.parameters():
            p.mul_(-2.0).add_(1.0)
        for state in o.state.values():
            for v in state.values():
                v.add_(3.0)
    mgr.wait()
    m2, o2 = fresh()
    mgr.restore(path, m2, o2)
    assert state_dicts_equal(want, m2.state_dict())
    got_opt = o2.state_dict()["state"][0]
    assert all(torch.equal(want_opt[k], got_opt[k]) for k in want_opt)
    assert reckpt.verify(path).ok
    mgr.close()


def test_fork_snapshot_child_is_reaped_and_state_frozen(tmp_path) -> None:
    m, o = trained()
    parts = collect_parts(m, o, None, None, "name")
    want = {k: v.clone() for k, v in m.state_dict().items()}
    snap = ForkSnapshot(parts, is_coordinator=True)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    target = str(tmp_path / "model.ckpt-1")
    save_parts(target, parts, snapshot=snap)
    snap.close()
    snap.close()  # idempotent
    assert _no_children_left(snap.pid)
    m2, _ = fresh()
    reckpt.restore_model(target, m2)
    assert state_dicts_equal(want, m2.state_dict())


def test_a_killed_snapshot_process_aborts_the_save_and_keeps_the_last(tmp_path) -> None:
    m, o = trained()
    root = str(tmp_path)
    reckpt.save_model(f"{root}/model.ckpt-1", m, o)
    parts = collect_parts(m, o, None, None, "name")
    snap = ForkSnapshot(parts, is_coordinator=True)
    os.kill(snap.pid, signal.SIGKILL)
    with pytest.raises(SnapshotProcessError, match="killed by signal SIGKILL") as info:
        save_parts(f"{root}/model.ckpt-2", parts, snapshot=snap)
    assert isinstance(info.value, ChildProcessError)
    snap.close()
    assert sorted(os.listdir(root)) == ["model.ckpt-1"]  # nothing half-written is left behind
    assert reckpt.verify(f"{root}/model.ckpt-1").ok


def test_an_error_in_the_snapshot_process_is_raised_by_wait_then_saving_goes_on(tmp_path) -> None:
    m, o = trained()
    root = str(tmp_path)
    mgr = reckpt.CheckpointManager(root, async_save=True, async_snapshot="fork")
    bad = {"state": {"callback": lambda: None}}  # not picklable: fails in the child's write

    class Extra:
        def state_dict(self) -> dict[str, object]:
            return bad

    mgr.save(1, m, o, extra_states={"extra": Extra()})
    with pytest.raises(Exception) as info:
        mgr.wait()
    assert "lambda" in str(info.value) or "pickle" in str(info.value).lower()
    assert not os.path.exists(f"{root}/model.ckpt-1")
    mgr.save(2, m, o)
    mgr.close()
    assert reckpt.verify(f"{root}/model.ckpt-2").ok


def test_fork_on_memory_store_is_refused(tmp_path) -> None:
    m, o = trained()
    mgr = reckpt.CheckpointManager("memory://fork-refused/run", async_save=True, async_snapshot="fork")
    with pytest.raises(ConfigError, match="memory://"):
        mgr.save(1, m, o)
    mgr.close()
    assert not storage_for("memory://fork-refused").exists("memory://fork-refused/run/model.ckpt-1")


def test_bad_snapshot_mode_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="async_snapshot"):
        reckpt.CheckpointManager("memory://x/run", async_snapshot="cow")


def test_shared_memory_tensors_and_stateful_values_are_frozen_at_the_fork(tmp_path) -> None:
    shared = torch.arange(1000, dtype=torch.float32).share_memory_()  # not copy-on-write
    sched_owner = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(sched_owner, step_size=1, gamma=0.1)
    parts = [("extra", {"shared": shared, "sched": sched})]
    snap = ForkSnapshot(parts, is_coordinator=True)
    frozen = dict(snap.parts)["extra"]
    assert frozen["shared"] is not shared and isinstance(frozen["sched"], dict)  # stateful -> its state dict
    shared.mul_(-1.0)
    sched_owner.step()
    sched.step()
    target = str(tmp_path / "model.ckpt-1")
    save_parts(target, snap.parts, snapshot=snap)
    snap.close()
    got = read_part(target, "extra")
    assert torch.equal(got["shared"], torch.arange(1000, dtype=torch.float32))
    assert "sched.last_epoch" in got  # planned and written as the state dict it was at the fork


def test_the_childs_error_says_where_it_was_raised(tmp_path) -> None:
    m, o = trained()
    parts = [*collect_parts(m, o, None, None, "name"), ("extra", {"callback": lambda: None})]
    snap = ForkSnapshot(parts, is_coordinator=True)
    with pytest.raises(Exception) as info:
        save_parts(str(tmp_path / "model.ckpt-1"), snap.parts, snapshot=snap)
    snap.close()
    notes = "\n".join(getattr(info.value, "__notes__", [])) + str(info.value)
    assert f"snapshot process {snap.pid}" in notes and "extra" in notes
