"""CheckpointManager on 2 gloo processes."""

from __future__ import annotations

from tests.distributed.launcher import run_world


def test_manager_two_processes(tmp_path) -> None:
    run_world(2, "tests.distributed.scenarios.manager_world", str(tmp_path / "run"))
