"""Event-time triggers and dataloader state on 2 gloo processes."""

from __future__ import annotations

from tests.distributed.launcher import run_world


def test_event_time_two_processes(tmp_path) -> None:
    run_world(2, "tests.distributed.event_time_scenarios.event_time_world", str(tmp_path / "run"))


def test_save_dataloader_state_two_processes(tmp_path) -> None:
    run_world(2, "tests.distributed.event_time_scenarios.dataloader_state_world", str(tmp_path / "run"))
