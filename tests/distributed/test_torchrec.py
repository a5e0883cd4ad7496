"""TorchRec DistributedModelParallel on 2 gloo processes: fused optimizer state across a plan change."""

from __future__ import annotations

from tests.distributed.launcher import run_world


def test_plan_change_reinitialises_fused_optimizer_state(tmp_path) -> None:
    run_world(
        2,
        "tests.distributed.torchrec_scenarios.plan_change_reinitialises_fused_state",
        str(tmp_path),
        timeout_s=400,
    )


def test_resumed_run_reproduces_saved_plan(tmp_path) -> None:
    run_world(
        2, "tests.distributed.torchrec_scenarios.resumed_run_reproduces_plan", str(tmp_path), timeout_s=300
    )


def test_fork_snapshot_freezes_sharded_state(tmp_path) -> None:
    run_world(
        2,
        "tests.distributed.torchrec_scenarios.fork_snapshot_freezes_sharded_state",
        str(tmp_path),
        timeout_s=300,
    )
