"""Storage faults: transient ones are retried, persistent ones end in a clear error, and the
previous checkpoint stays intact with nothing half-written visible (real files, real moto)."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any

import pytest

import reckpt
from reckpt.commit.removal import cleanup_stale
from reckpt.commit.state import OwnerRecord, checkpoint_state
from reckpt.naming import staging_name
from reckpt.storage.core import StorageError, storage_for
from reckpt.testing.faults import Fault, FaultInjector, FaultProxy, FaultyFileSystem, disk_full, read_only
from tests.helpers import fresh, optim_states_equal, state_dicts_equal, trained


def _previous_is_intact(root: str, m1, o1) -> None:  # type: ignore[no-untyped-def]
    assert reckpt.verify(f"{root}/model.ckpt-1").ok
    assert reckpt.latest_checkpoint(root) == (f"{root}/model.ckpt-1", 1)
    m, o = fresh()
    reckpt.restore_model(f"{root}/model.ckpt-1", m, o)
    assert state_dicts_equal(m.state_dict(), m1.state_dict()) and optim_states_equal(o, o1)


@pytest.mark.parametrize("op", ["mkdir", "write", "append", "rename", "fsync", "read", "list"])
def test_transient_faults_are_retried(tmp_path: Path, op: str) -> None:
    root = str(tmp_path)
    inj = FaultInjector([Fault(op, "transient", f"{root}/*", times=2)])
    m, o = trained()
    opts = {"injector": inj}
    reckpt.save_model(f"faulty://{root}/model.ckpt-2", m, o, storage_options=opts)
    m2, o2 = fresh()
    reckpt.restore_model(f"faulty://{root}/model.ckpt-2", m2, o2, storage_options=opts)
    assert len(inj.injected) == 2, inj.injected
    assert reckpt.verify(f"{root}/model.ckpt-2").ok
    assert state_dicts_equal(m2.state_dict(), m.state_dict()) and optim_states_equal(o2, o)


@pytest.mark.parametrize("op", ["mkdir", "write", "append", "rename", "fsync"])
@pytest.mark.parametrize(
    ("error", "hint"),
    [
        ("ENOSPC", "the storage is full; free space or choose another model_dir"),
        ("EROFS", "the location is read-only; choose a writable model_dir"),
        ("EIO", "gave up after 4 attempt(s); check the storage and retry"),
    ],
)
def test_persistent_faults_end_in_a_clear_error(tmp_path: Path, op: str, error: str, hint: str) -> None:
    root = str(tmp_path)
    m1, o1 = trained(seed=1)
    reckpt.save_model(f"{root}/model.ckpt-1", m1, o1)
    inj = FaultInjector([Fault(op, error, f"{root}/*")])
    with pytest.raises(StorageError) as info:
        reckpt.save_model(
            f"faulty://{root}/model.ckpt-2", *trained(seed=2), storage_options={"injector": inj}
        )
    assert inj.injected, "the fault never fired"
    if op != "append":  # mid-stream: one attempt (only EAGAIN is retried there)
        assert hint in str(info.value) and f"faulty://{root}/" in str(info.value)
    assert info.value.errno == getattr(errno, error)
    st = storage_for(root)
    assert checkpoint_state(st, f"{root}/model.ckpt-2") == "absent"
    _previous_is_intact(root, m1, o1)


def test_faulty_filesystem_by_url_and_explicitly(tmp_path: Path) -> None:
    fs = FaultyFileSystem("file", faults=read_only())
    with pytest.raises(OSError, match="Read-only file system"):
        fs.pipe_file(str(tmp_path / "x"), b"1")
    assert not (tmp_path / "x").exists()
    st = storage_for(f"faulty://{tmp_path}", {"faults": disk_full(after_writes=1)})
    assert st.atomic_rename  # wrapping local disk keeps the POSIX protocol
    st.write_bytes(f"faulty://{tmp_path}/a", b"1")
    with pytest.raises(StorageError, match="ENOSPC"):
        st.write_bytes(f"faulty://{tmp_path}/b", b"2")
    with pytest.raises(ValueError, match=r"Fault\.error"):
        Fault("write", "EXPLODE")


def test_next_start_removes_ownerless_staging_and_dead_temp_files(tmp_path: Path) -> None:
    """A writer killed between mkdir and its owner record, or mid atomic replace, leaves debris."""
    st = storage_for(str(tmp_path))
    (tmp_path / staging_name("aa")).mkdir()  # no owner record, no file
    busy = tmp_path / staging_name("bb")
    busy.mkdir()
    (busy / "x").write_bytes(b"fresh")  # no owner record, but written just now: kept
    live = tmp_path / staging_name("cc")
    live.mkdir()
    (live / ".reckpt-owner.json").write_bytes(OwnerRecord.mine("cc", "t", time.time()).to_json())
    ckpt = tmp_path / "model.ckpt-1"
    ckpt.mkdir()
    (ckpt / "reckpt.metrics.sidecar.json.tmp-999999999-abcd1234").write_bytes(b"{}")
    (ckpt / f"reckpt.metrics.sidecar.json.tmp-{os.getpid()}-abcd1234").write_bytes(b"{}")
    removed = cleanup_stale(st, str(tmp_path))
    assert sorted(os.path.basename(p) for p in removed) == [
        staging_name("aa"),
        "reckpt.metrics.sidecar.json.tmp-999999999-abcd1234",
    ]
    assert busy.exists() and live.exists()


def test_s3_transient_faults_are_retried(s3_server: dict[str, Any], s3_root: str) -> None:
    port = int(s3_server["endpoint"].rsplit(":", 1)[1])
    m1, o1 = trained(seed=1)
    reckpt.save_model(f"{s3_root}/model.ckpt-1", m1, o1)
    with FaultProxy(port, error_rate=0.15, drop_rate=0.05, seed=3) as proxy:
        opts = {"endpoint_url": proxy.endpoint}
        m2, o2 = trained(seed=2)
        reckpt.save_model(f"{s3_root}/model.ckpt-2", m2, o2, storage_options=opts)
        m, o = fresh()
        reckpt.restore_model(f"{s3_root}/model.ckpt-2", m, o, storage_options=opts)
    assert proxy.errors + proxy.drops > 0, "the proxy injected nothing"
    assert state_dicts_equal(m.state_dict(), m2.state_dict()) and optim_states_equal(o, o2)
    assert reckpt.verify(f"{s3_root}/model.ckpt-2").ok


def test_s3_persistent_faults_end_in_a_clear_error(s3_server: dict[str, Any], s3_root: str) -> None:
    port = int(s3_server["endpoint"].rsplit(":", 1)[1])
    m1, o1 = trained(seed=1)
    reckpt.save_model(f"{s3_root}/model.ckpt-1", m1, o1)
    with FaultProxy(port, error_rate=1.0) as proxy:
        opts = {"endpoint_url": proxy.endpoint, "config_kwargs": {"retries": {"max_attempts": 1}}}
        with pytest.raises(StorageError, match=r"gave up after 4 attempt\(s\); check the storage and retry"):
            reckpt.save_model(f"{s3_root}/model.ckpt-2", *trained(seed=2), storage_options=opts)
    assert proxy.errors >= 4
    assert checkpoint_state(storage_for(s3_root), f"{s3_root}/model.ckpt-2") == "absent"
    _previous_is_intact(s3_root, m1, o1)


def test_a_failed_delete_after_the_commit_does_not_fail_the_save(tmp_path: Path) -> None:
    """Removing the owner record is the only delete of a save: the checkpoint is committed by then."""
    root = str(tmp_path)
    inj = FaultInjector([Fault("delete", "EIO", f"{root}/*")])
    m, o = trained()
    reckpt.save_model(f"faulty://{root}/model.ckpt-2", m, o, storage_options={"injector": inj})
    assert inj.injected and reckpt.verify(f"{root}/model.ckpt-2").ok


_SHORT_WRITE = """
import resource, signal, sys
import torch, reckpt
root = sys.argv[1]
reckpt.save_model(root + "/model.ckpt-1", torch.nn.Linear(8, 8))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))  # later writes stop part-way, as on a full disk
try:
    reckpt.save_model(root + "/model.ckpt-2", torch.nn.Linear(512, 512))
except Exception as e:
    print(type(e).__name__ + "|" + str(e))
"""


def test_a_real_short_write_says_what_happened(tmp_path: Path) -> None:
    """A write that stops part-way (a full disk, a file-size limit) is reported with the file and
    its cause, not as ``torch.save``'s zip error (``unexpected pos 704 vs 598``)."""
    import subprocess
    import sys

    root = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-c", _SHORT_WRITE, str(root)], capture_output=True, text=True, timeout=300
    )
    kind, _, message = out.stdout.strip().rpartition("\n")[-1].partition("|")
    assert kind == "StorageError", out.stdout + out.stderr
    assert "model/__0_0.distcp: write failed (EFBIG: File too large)" in message and "\n" not in message
    assert reckpt.verify(str(root / "model.ckpt-1")).ok
    assert sorted(p.name for p in root.iterdir()) == ["model.ckpt-1"]
