"""SIGKILL a saving process at each phase of the commit protocol: nothing half-written is visible."""

from __future__ import annotations

import fnmatch
import signal
import subprocess

import pytest

import reckpt
from reckpt.commit.state import checkpoint_state
from reckpt.naming import parse_step
from reckpt.storage.core import storage_for
from tests.helpers import fresh, optim_states_equal, state_dicts_equal, trained
from tests.helpers.processes import run_worker

POINTS = ["begin", "after_model", "after_optimizer", "before_commit", "after_manifest"]


def _run_worker(module: str, *args: str, kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m tests.distributed.<module> ARGS`` with an optional SIGKILL fault point."""
    env = {"RECKPT_FAULT_KILL_AT": kill_at} if kill_at else None
    return run_worker(f"tests.distributed.{module}", *args, env=env)


def _save_in_subprocess(root: str, step: int, kill_at: str | None) -> int:
    return _run_worker("crash_worker", root, str(step), kill_at=kill_at).returncode


def _tzrec_globbed(storage, root: str) -> list[str]:
    """What TorchEasyRec's latest_checkpoint would consider: model.ckpt-* directories."""
    return [n for n in storage.ls(root) if fnmatch.fnmatch(n, "model.ckpt-*")]


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_kill_at_every_phase(backend: str, tmp_path, request) -> None:
    root = str(tmp_path / "run") if backend == "local" else request.getfixturevalue("s3_root")
    st = storage_for(root)
    m1, o1 = trained(seed=1)
    reckpt.save_model(f"{root}/model.ckpt-1", m1, o1)
    for i, point in enumerate(POINTS):
        step = 10 + i
        rc = _save_in_subprocess(root, step, point)
        assert rc == -signal.SIGKILL, f"{point}: the fault point did not fire (rc={rc})"
        target = f"{root}/model.ckpt-{step}"
        committed_now = point == "after_manifest" and not st.atomic_rename
        if committed_now:
            # Object stores: the manifest is the commit marker, the save is complete.
            assert checkpoint_state(st, target) == "committed" and reckpt.verify(target).ok
        else:
            assert checkpoint_state(st, target) in ("absent", "incomplete"), point
            assert reckpt.latest_checkpoint(root) == (f"{root}/model.ckpt-1", 1), point
        if st.atomic_rename:  # nothing TorchEasyRec would glob except committed checkpoints
            assert sorted(_tzrec_globbed(st, root)) == ["model.ckpt-1"], point
        # The previous checkpoint still restores bit-exact.
        m, o = fresh()
        reckpt.restore_model(f"{root}/model.ckpt-1", m, o)
        assert state_dicts_equal(m.state_dict(), m1.state_dict()) and optim_states_equal(o, o1)
        if committed_now:
            reckpt.restore_model(target, *fresh())
            st.rm(target, recursive=True)
    # The next save (a new process: the dead writers' pids are gone) cleans the debris.
    assert _save_in_subprocess(root, 50, None) == 0
    names = st.ls(root)
    assert [n for n in names if n.startswith(".reckpt-")] == [], names
    steps = sorted(s for s in (parse_step(n) for n in names) if s is not None)
    assert steps == [1, 50], names
    assert reckpt.verify(f"{root}/model.ckpt-50").ok


def test_live_staging_is_never_cleaned(tmp_path) -> None:
    """A staging area whose owner is alive (this process) survives another save's cleanup."""
    from reckpt.commit.removal import cleanup_stale
    from reckpt.commit.state import OwnerRecord
    from reckpt.naming import OWNER_FILE, staging_name

    st = storage_for(str(tmp_path))
    live = tmp_path / staging_name("abc")
    live.mkdir()
    import time

    (live / OWNER_FILE).write_bytes(OwnerRecord.mine("abc", "x", time.time()).to_json())
    dead = tmp_path / staging_name("def")
    dead.mkdir()
    (dead / OWNER_FILE).write_bytes(OwnerRecord("h", 1, "def", "x", 0.0, 0.0).to_json())
    removed = cleanup_stale(st, str(tmp_path))
    assert removed == [str(tmp_path / staging_name("def"))]
    assert live.exists() and not dead.exists()


@pytest.mark.parametrize("point", ["after_model", "after_train_state", "after_manifest"])
def test_kill_during_async_save(tmp_path, point: str) -> None:
    """SIGKILL from the background writer: the previous checkpoint stays committed and restorable."""
    root = str(tmp_path / "run")
    m1, o1 = trained(seed=1)
    reckpt.save_model(f"{root}/model.ckpt-1", m1, o1)
    proc = _run_worker("crash_worker", root, "2", "async", kill_at=point)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    st = storage_for(root)
    assert checkpoint_state(st, f"{root}/model.ckpt-2") in ("absent", "incomplete")
    assert reckpt.latest_checkpoint(root) == (f"{root}/model.ckpt-1", 1)
    m, o = fresh()
    reckpt.restore_model(f"{root}/model.ckpt-1", m, o)
    assert state_dicts_equal(m.state_dict(), m1.state_dict()) and optim_states_equal(o, o1)


@pytest.mark.parametrize(
    ("backend", "point"),
    [("local", "delete_renamed"), ("s3", "delete_marked"), ("s3", "delete_unmanifested")],
)
def test_kill_during_pruning_leaves_nothing_half_committed(
    tmp_path, request, backend: str, point: str
) -> None:
    root = str(tmp_path / "run") if backend == "local" else request.getfixturevalue("s3_root")
    m, _ = trained()
    for step in (1, 2):
        reckpt.save_model(f"{root}/model.ckpt-{step}", m)
    proc = _run_worker("prune_worker", root, kill_at=point)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    st = storage_for(root)
    assert checkpoint_state(st, f"{root}/model.ckpt-1") in ("absent", "incomplete")
    assert reckpt.latest_checkpoint(root) == (f"{root}/model.ckpt-2", 2)
    assert reckpt.verify(f"{root}/model.ckpt-2").ok
    # The next pass finishes the job.
    mgr = reckpt.CheckpointManager(root, keep_checkpoint_max=1)
    mgr.prune()
    mgr.close()
    assert [n for n in st.ls(root) if n != "model.ckpt-2"] == []
