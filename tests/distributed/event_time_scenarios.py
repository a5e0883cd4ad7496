"""Event-time saves and dataloader state on real gloo process groups (see launcher.run_world)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import reckpt
from reckpt import DATA_TS_WATERMARK, EPOCHS_COMPLETED


def event_time_world(rank: int, world: int, root: str) -> None:
    """Two ranks with different event times: the quorum time decides, identically on both."""
    assert world == 2
    torch.manual_seed(0)
    model = nn.Linear(2, 1)  # replicated: the same on both ranks
    mgr = reckpt.CheckpointManager(root)
    mgr.set_save_policy(ts_interval_s=3600, ts_quorum=1.0)  # every rank must be past a time
    assert mgr.needs_worker_timestamps()
    # (rank 0's time, rank 1's time) -> saved?, the reference after the step
    steps = [
        ((3599.0, -1.0), False, None),  # rank 1 has no time yet: the quorum is not met
        ((3599.0, 3500.0), False, 3500.0),  # the first quorum time only seeds
        ((7300.0, 3599.0), False, 3500.0),  # rank 1 is still in the first hour
        ((7300.0, 3600.0), True, 3600.0),  # now both are past 3600
    ]
    for step, (times, saved, last) in enumerate(steps, start=1):
        state = {f"topic:{rank}": step}
        assert mgr.maybe_save(step, model, dataloader_state=state, data_timestamp=times[rank]) is saved, step
        assert mgr._last_data_ts == last, (step, mgr._last_data_ts)
        assert DATA_TS_WATERMARK not in state
    mgr.close()
    ck4 = f"{root}/model.ckpt-4"
    assert reckpt.restore_dataloader_state(ck4) == {"topic:0": 4, "topic:1": 4, DATA_TS_WATERMARK: 3600.0}

    # A resumed job, quorum 0.5 (of 2 ranks: the later time), ends a pass at the saved step.
    mgr = reckpt.CheckpointManager(root)
    mgr.set_save_policy(save_epochs=1, ts_interval_s=3600, ts_quorum=0.5)
    mgr.restore(ck4, nn.Linear(2, 1))  # seeds the reference on every rank
    assert mgr._last_data_ts == 3600.0
    assert not mgr.maybe_save(4, model, dataloader_state={EPOCHS_COMPLETED: 1}, epoch=0)  # deduplicated
    assert reckpt.restore_dataloader_state(ck4) == {EPOCHS_COMPLETED: 1, DATA_TS_WATERMARK: 3600.0}
    assert not mgr.maybe_save(5, model, data_timestamp=(5000.0, -1.0)[rank])
    assert mgr.maybe_save(6, model, dataloader_state={}, data_timestamp=(5000.0, 7250.0)[rank])
    assert mgr._last_data_ts == 7250.0
    mgr.close()
    assert reckpt.restore_dataloader_state(f"{root}/model.ckpt-6") == {DATA_TS_WATERMARK: 7250.0}
    if rank == 0:
        assert reckpt.verify(ck4).ok  # the refreshed state went into a sidecar


def dataloader_state_world(rank: int, world: int, root: str) -> None:
    """save_dataloader_state gathers every rank's state; rank 0 writes the per-key max."""
    plain = f"{root}/plain"
    reckpt.save_dataloader_state(plain, {f"part:{rank}": 10 + rank, "shared:0": 100 * (rank + 1)})
    dist.barrier()  # rank 0 writes after the gather; the others may return first
    want = {**{f"part:{r}": 10 + r for r in range(world)}, "shared:0": 100 * world}
    assert reckpt.restore_dataloader_state(plain) == want
    ck = f"{root}/model.ckpt-1"
    reckpt.save_model(ck, nn.Linear(2, 1), dataloader_state={f"part:{rank}": 1})
    reckpt.save_dataloader_state(ck, {f"part:{rank}": 5 * (rank + 1), EPOCHS_COMPLETED: 1})
    dist.barrier()
    assert reckpt.restore_dataloader_state(ck) == {
        **{f"part:{r}": 5 * (r + 1) for r in range(world)},
        EPOCHS_COMPLETED: 1,
    }
    assert reckpt.is_committed(ck)
    if rank == 0:
        assert reckpt.verify(ck).ok
