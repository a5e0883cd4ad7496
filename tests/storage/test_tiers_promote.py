"""Promotion on real storage (local folders, file://, moto's S3): one writer, many, a killed persister."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

import reckpt
from reckpt.commit.state import checkpoint_state, pid_alive
from reckpt.errors import IntegrityError
from reckpt.naming import MANIFEST_FILE
from reckpt.storage.core import Storage, storage_for
from reckpt.tiers.config import Tier, TierSet
from reckpt.tiers.control import PERSISTER_FAULT_ENV, Control, Request
from reckpt.tiers.promote import commit_shared, contribute_shared, copy_checkpoint, is_shared_file
from tests.helpers import flip_bit, fresh, state_dicts_equal, trained


def _source(tmp_path: Path, step: int = 7) -> str:
    m, o = trained(seed=3)
    path = str(tmp_path / "src" / f"model.ckpt-{step}")
    reckpt.save_model(path, m, o)
    return path


def _manifest(path: str) -> bytes:
    return Path(path, MANIFEST_FILE).read_bytes()


def test_copy_is_committed_identical_and_idempotent(tmp_path: Path, shared_root: str) -> None:
    src = _source(tmp_path)
    dst = f"{shared_root}/model.ckpt-7"
    st = storage_for(dst)
    copied = copy_checkpoint(storage_for(src), src, _manifest(src), st, dst)
    assert copied is not None and copied > 0
    assert checkpoint_state(st, dst) == "committed" and reckpt.verify(dst).ok
    assert st.read_bytes(Storage.join(dst, MANIFEST_FILE)) == _manifest(src)
    assert copy_checkpoint(storage_for(src), src, _manifest(src), st, dst) is None  # already there
    m, o = fresh()
    reckpt.restore_model(dst, m, o)
    assert state_dicts_equal(m.state_dict(), trained(seed=3)[0].state_dict())


def test_damaged_source_is_never_promoted(tmp_path: Path, shared_root: str) -> None:
    src = _source(tmp_path)
    flip_bit(src)
    dst = f"{shared_root}/model.ckpt-7"
    st = storage_for(dst)
    with pytest.raises(IntegrityError, match="damaged"):
        copy_checkpoint(storage_for(src), src, _manifest(src), st, dst)
    assert checkpoint_state(st, dst) in ("absent", "incomplete")
    assert not [n for n in st.ls(shared_root) if n.startswith(".reckpt-staging")]


def test_a_missing_file_stops_a_complete_copy_but_not_a_node_part(tmp_path: Path) -> None:
    src = _source(tmp_path)
    os.remove(os.path.join(src, "model", "__0_0.distcp"))
    st = storage_for(str(tmp_path))
    with pytest.raises(IntegrityError, match="missing"):
        copy_checkpoint(st, src, _manifest(src), st, str(tmp_path / "a" / "model.ckpt-7"))
    part = str(tmp_path / "b" / "model.ckpt-7")
    copy_checkpoint(st, src, _manifest(src), st, part, complete=False)
    assert checkpoint_state(st, part) == "committed"
    assert not os.path.exists(os.path.join(part, "model", "__0_0.distcp"))
    assert os.path.exists(os.path.join(part, "model", ".metadata"))


def _node_parts(tmp_path: Path, src: str) -> tuple[str, str]:
    """Two nodes' parts of one checkpoint: node 0 lacks the model's data file, node 1 holds it."""
    node0 = str(tmp_path / "node0" / "model.ckpt-7")
    node1 = str(tmp_path / "node1" / "model.ckpt-7")
    shutil.copytree(src, node0)
    shutil.copytree(src, node1)
    os.remove(os.path.join(node0, "model", "__0_0.distcp"))
    for rel in storage_for(node1).walk_files(node1):
        if rel.endswith(".distcp") and rel != "model/__0_0.distcp":
            os.remove(os.path.join(node1, rel))
    return node0, node1


@pytest.mark.parametrize("backend", ["folder", "s3"])
def test_a_shared_copy_commits_only_when_every_node_arrived(tmp_path: Path, backend: str, request) -> None:
    src = _source(tmp_path)
    node0, node1 = _node_parts(tmp_path, src)
    root = str(tmp_path / "durable") if backend == "folder" else request.getfixturevalue("s3_root")
    dst = f"{root}/model.ckpt-7"
    st, local = storage_for(dst), storage_for(node0)
    manifest = _manifest(src)
    failures: list[BaseException] = []

    def first_node() -> None:
        try:
            commit_shared(local, node0, manifest, st, dst, timeout_s=60, poll_s=0.05)
        except BaseException as e:
            failures.append(e)

    worker = threading.Thread(target=first_node)
    worker.start()
    time.sleep(1.0)  # node 0 uploaded its part and waits for node 1's file
    assert checkpoint_state(st, dst) != "committed"
    uploaded = contribute_shared(local, node1, manifest, st, dst, timeout_s=60, poll_s=0.05)
    worker.join()
    assert not failures, failures
    assert uploaded == os.path.getsize(os.path.join(src, "model", "__0_0.distcp"))
    assert checkpoint_state(st, dst) == "committed" and reckpt.verify(dst).ok
    assert contribute_shared(local, node1, manifest, st, dst, timeout_s=5, poll_s=0.05) is None
    assert is_shared_file("model/.metadata")


def test_a_shared_copy_missing_a_node_times_out_and_leaves_nothing(tmp_path: Path) -> None:
    src = _source(tmp_path)
    node0, _ = _node_parts(tmp_path, src)
    root = str(tmp_path / "durable")
    st = storage_for(root)
    with pytest.raises(TimeoutError, match="did not arrive"):
        commit_shared(st, node0, _manifest(src), st, f"{root}/model.ckpt-7", timeout_s=0.5, poll_s=0.05)
    assert checkpoint_state(st, f"{root}/model.ckpt-7") == "absent"
    assert st.ls(root) == []


def _wait_gone(control: Control, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while control.persister_running():
        assert time.monotonic() < deadline, "the persister did not exit"
        time.sleep(0.05)


@pytest.mark.parametrize("kill_at", [9, 12, 16, 20, 26])
def test_a_persister_killed_mid_promotion_leaves_no_half_copy_and_resumes(
    tmp_path: Path, kill_at: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiers = TierSet([Tier("memory", str(tmp_path / "mem"), 1), Tier("durable", str(tmp_path / "dur"), 1)])
    m, o = trained(seed=3)
    reckpt.save_model(tiers["memory"].checkpoint_dir(7), m, o)
    control = Control(tiers.control_dir)
    control.write_config({"tiers": tiers.to_json(), "node": 0, "nodes": 1})
    control.register_trainer()
    control.trainer_closed()  # a persister exits once nothing is pending (or when it is killed)
    control.add(Request(7, "memory", ("durable",)))
    target = tiers["durable"].checkpoint_dir(7)
    st = storage_for(target)
    monkeypatch.setenv(PERSISTER_FAULT_ENV, f"op:{kill_at}")
    assert control.start_persister()
    pid = control.persister_pid()
    _wait_gone(control)  # killed by the fault knob: its lock is free
    deadline = time.monotonic() + 30
    while pid is not None and pid_alive(pid):  # until its parent (init) has reaped it
        assert time.monotonic() < deadline
        time.sleep(0.05)
    state = checkpoint_state(st, target)
    assert state in ("absent", "incomplete") or reckpt.verify(target).ok
    if state != "committed":
        assert [r.step for r in control.pending()] == [7]  # the request survives the kill
    monkeypatch.delenv(PERSISTER_FAULT_ENV)
    control.start_persister()
    _wait_gone(control)
    assert control.pending() == []
    assert checkpoint_state(st, target) == "committed" and reckpt.verify(target).ok
    assert not [n for n in st.ls(str(tmp_path / "dur")) if n.startswith(".reckpt-")]
