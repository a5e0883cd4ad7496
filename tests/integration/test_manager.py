"""CheckpointManager: cadence, dedupe, retention with best and leases, async save, exact resume."""

from __future__ import annotations

import os
import random
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import reckpt
from reckpt.errors import CheckpointNotFoundError, StepAlreadyExistsError
from reckpt.format.eval_results import read_checkpoint_metrics
from reckpt.format.manifest import read_sidecar
from reckpt.storage.core import storage_for
from tests.helpers import fresh, state_dicts_equal, trained


def _steps(root: str) -> list[int]:
    return [c.step for c in reckpt.list_checkpoints(root) if c.committed]


def test_cadence_dedupe_and_dataloader_sidecar(tmp_path) -> None:
    root = str(tmp_path)
    m, o = trained()
    with reckpt.CheckpointManager(root, save_steps=5) as mgr:
        saved = [s for s in range(1, 13) if mgr.maybe_save(s, m, o, dataloader_state={"a:0": s})]
        assert saved == [5, 10]
        assert not mgr.maybe_save(
            10, m, o, dataloader_state={"a:0": 99, "__epochs_completed__": 1}, final=True
        )
        assert mgr.maybe_save(12, m, o, final=True)
    assert _steps(root) == [5, 10, 12]
    ck10 = f"{root}/model.ckpt-10"
    # The committed checkpoint is untouched; the refreshed position lives in a sidecar.
    assert reckpt.verify(ck10).ok
    assert reckpt.restore_dataloader_state(ck10) == {"a:0": 99, "__epochs_completed__": 1}


def test_retention_keeps_newest_best_and_leased(tmp_path) -> None:
    root = str(tmp_path)
    m, o = trained()
    cfg = SimpleNamespace(exporter_type="best", best_exporter_metric="auc", metric_larger_is_better=True)
    mgr = reckpt.CheckpointManager(root, keep_checkpoint_max=2, export_config=cfg)
    aucs = {1: 0.5, 2: 0.9, 3: 0.6, 4: 0.7, 5: 0.65, 6: 0.1}
    with reckpt.lifecycle.lease(_save(mgr, m, o, 1, aucs), holder="eval", ttl_s=60):
        for step in range(2, 7):
            _save(mgr, m, o, step, aucs)
        mgr.close()  # drain pruning
        assert _steps(root) == [1, 2, 5, 6]  # leased 1, best 2, newest two
    mgr.prune()
    mgr.close()
    assert _steps(root) == [2, 5, 6]
    assert not list((tmp_path / ".reckpt-leases").iterdir())


def _save(mgr, m, o, step, aucs) -> str:
    path = mgr.save(step, m, o)
    mgr.record_eval(step, {"auc": aucs[step]})
    return path


def test_expired_lease_does_not_pin(tmp_path) -> None:
    root = str(tmp_path)
    m, _ = trained()
    mgr = reckpt.CheckpointManager(root, keep_checkpoint_max=1)
    ck = mgr.save(1, m)
    with reckpt.lifecycle.lease(ck, ttl_s=5.0):
        mgr.save(2, m)
        mgr.close()
        assert _steps(root) == [1, 2]
        # A reader that died: its record stays, but expires (the context here still renews
        # it, so write an expired one by hand to model the dead reader).
    dead = tmp_path / ".reckpt-leases" / "2.deadbeef.json"
    dead.write_text(
        '{"step": 2, "token": "deadbeef", "holder": "x", "host": "h", "pid": 1, "expires_at": 1.0}'
    )
    mgr.save(3, m)
    mgr.close()
    assert _steps(root) == [3]
    with pytest.raises(CheckpointNotFoundError), reckpt.lifecycle.lease(f"{root}/model.ckpt-1"):
        pass


def test_protect_checkpoint_maps_to_lease(tmp_path) -> None:
    root = str(tmp_path)
    m, _ = trained()
    mgr = reckpt.CheckpointManager(root, keep_checkpoint_max=1)
    mgr.protect_checkpoint(mgr.save(1, m))
    mgr.save(2, m)
    mgr.save(3, m)
    mgr.close()
    assert _steps(root) == [1, 3]


def test_async_save_snapshot_is_isolated_from_later_updates(root: str) -> None:
    m, o = trained()
    want = {k: v.clone() for k, v in m.state_dict().items()}
    mgr = reckpt.CheckpointManager(root, async_save=True)
    path = mgr.save(3, m, o)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)  # training goes on immediately, in place
    mgr.wait()
    m2, o2 = fresh()
    info = mgr.restore(path, m2, o2)
    assert state_dicts_equal(want, m2.state_dict()) and info.step == 3
    timings = read_sidecar(storage_for(root), path, "metrics")["save"]
    assert timings["async"] is True and 0 <= timings["stall_s"] <= timings["total_s"]
    mgr.close()


def test_async_failure_surfaces_on_next_call_and_close(tmp_path) -> None:
    root = str(tmp_path)
    m, _ = trained()
    reckpt.save_model(f"{root}/model.ckpt-1", m)
    mgr = reckpt.CheckpointManager(root, async_save=True)
    mgr.save(1, m)  # the target exists: fails in the background
    with pytest.raises(StepAlreadyExistsError):
        mgr.save(2, m)
    mgr.save(1, m)
    with pytest.raises(StepAlreadyExistsError):
        mgr.close()
    mgr.close()  # idempotent, nothing left to raise


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 8)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(8, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.emb(ids)))


def _run(steps: range, net, opt, sched, scaler) -> list[float]:
    losses = []
    for _ in steps:
        ids = torch.randint(0, 64, (16,))  # data order from the torch RNG
        noise = random.random() + float(np.random.rand())
        loss = (net(ids).pow(2).mean() + noise) * 1.0
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        losses.append(loss.item())
    return losses


def _fresh_run(seed: int):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    return net, opt, sched, scaler


@pytest.mark.parametrize("async_save", [False, True])
def test_resume_is_exact(tmp_path, async_save: bool) -> None:
    """Train 10 steps straight vs 5 + save + restore into fresh objects + 5: identical losses."""
    net, opt, sched, scaler = _fresh_run(0)
    straight = _run(range(10), net, opt, sched, scaler)

    net, opt, sched, scaler = _fresh_run(0)
    first = _run(range(5), net, opt, sched, scaler)
    mgr = reckpt.CheckpointManager(str(tmp_path), async_save=async_save)
    mgr.save(4, net, opt, {"part:0": 80}, epoch=0, lr_scheduler=sched, grad_scaler=scaler)
    mgr.close()
    _run(range(3), net, opt, sched, scaler)  # the crashed run went on a bit

    net2, opt2, sched2, scaler2 = _fresh_run(123)
    mgr2 = reckpt.CheckpointManager(str(tmp_path))
    path, step = mgr2.latest_checkpoint()
    info = mgr2.restore(path, net2, opt2, lr_scheduler=sched2, grad_scaler=scaler2)
    assert (info.step, info.epoch, info.dataloader_state) == (4, 0, {"part:0": 80})
    assert step + 1 == 5
    resumed = _run(range(5), net2, opt2, sched2, scaler2)
    assert first + resumed == straight
    mgr2.close()


def test_final_save_at_resumed_step_is_not_repeated(tmp_path) -> None:
    m, o = trained()
    mgr = reckpt.CheckpointManager(str(tmp_path), save_steps=5)
    mgr.save(5, m, o)
    mgr.close()
    mgr2 = reckpt.CheckpointManager(str(tmp_path), save_steps=5)
    mgr2.restore(f"{tmp_path}/model.ckpt-5", *fresh())
    assert not mgr2.maybe_save(5, m, o, final=True)  # TorchEasyRec re-saved here
    mgr2.close()


def test_record_eval_goes_to_file_and_sidecar(tmp_path) -> None:
    root = str(tmp_path)
    m, _ = trained()
    mgr = reckpt.CheckpointManager(root, async_save=True)
    mgr.save(7, m)
    mgr.record_eval(7, {"auc": 0.71, "logloss": 0.4})
    mgr.close()
    assert read_checkpoint_metrics(storage_for(root), f"{root}/model.ckpt-7") == {"auc": 0.71, "logloss": 0.4}
    assert (tmp_path / "train_eval_result_v2.txt").read_text() == (
        '{"global_step": 7, "auc": 0.71, "logloss": 0.4}\n'
    )
    assert reckpt.verify(f"{root}/model.ckpt-7").ok


def test_interval_trigger(tmp_path) -> None:
    m, _ = trained()
    mgr = reckpt.CheckpointManager(str(tmp_path), save_interval_s=0.2)
    assert not mgr.maybe_save(1, m)
    time.sleep(0.25)
    assert mgr.maybe_save(2, m)
    assert not mgr.maybe_save(3, m)
    mgr.close()


def test_async_reuses_host_copy_without_mixing_saves(tmp_path) -> None:
    root = str(tmp_path)
    m, o = trained()
    mgr = reckpt.CheckpointManager(root, async_save=True, async_snapshot="copy")
    snapshots = {}
    for step in (1, 2, 3):
        snapshots[step] = {k: v.clone() for k, v in m.state_dict().items()}
        mgr.save(step, m, o)
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(1.5)
    first_buffer = mgr._saver._staged["model"]["tower.0.weight"]
    mgr.save(4, m, o)
    assert mgr._saver._staged["model"]["tower.0.weight"] is first_buffer  # reused, not reallocated
    mgr.close()
    for step, want in snapshots.items():
        m2, _ = fresh()
        reckpt.restore_model(f"{root}/model.ckpt-{step}", m2)
        assert state_dicts_equal(want, m2.state_dict()), step


def test_lease_and_prune_on_every_backend(root: str) -> None:
    m, _ = trained()
    mgr = reckpt.CheckpointManager(root, keep_checkpoint_max=1)
    with mgr.lease(mgr.save(1, m), holder="export"):
        mgr.save(2, m)
        mgr.save(3, m)
        mgr.close()
        assert _steps(root) == [1, 3]
    mgr.prune()
    mgr.close()
    assert _steps(root) == [3]


def test_two_jobs_one_model_dir(tmp_path) -> None:
    """The second writer refuses, naming the owner; a dead owner's lock is taken over."""
    import json
    import socket

    from reckpt.commit.writer_lock import LOCK_FILE, ModelDirLockedError

    m, _ = trained()
    first = reckpt.CheckpointManager(str(tmp_path))
    first.save(1, m)
    second = reckpt.CheckpointManager(str(tmp_path))
    with pytest.raises(ModelDirLockedError, match=rf"host {socket.gethostname()}, pid {os.getpid()}"):
        second.save(2, m)
    assert isinstance(ModelDirLockedError("x"), RuntimeError)
    first.close()
    assert not (tmp_path / LOCK_FILE).exists()
    second.save(2, m)  # free now
    second.close()
    # A lock left by a dead process on this host is stale: taken over.
    (tmp_path / LOCK_FILE).write_text(
        json.dumps(
            {
                "host": socket.gethostname(),
                "pid": 2**22 + 7,
                "token": "dead",
                "started_at": 0.0,
                "heartbeat_at": 0.0,
            }
        )
    )
    third = reckpt.CheckpointManager(str(tmp_path))
    third.save(3, m)
    third.close()
    assert [c.step for c in reckpt.list_checkpoints(str(tmp_path))] == [1, 2, 3]
