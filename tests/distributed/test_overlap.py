"""Resized tables on 2 gloo processes: table-, row- and column-wise, fused state, DTensor."""

from __future__ import annotations

from pathlib import Path

from tests.distributed.launcher import run_world


def test_grown_sharded_tables_load_their_overlap_with_fused_state(tmp_path: Path) -> None:
    run_world(2, "tests.distributed.overlap_scenarios.grown_tables", str(tmp_path), timeout_s=400)


def test_resized_dtensor_loads_its_overlap(tmp_path: Path) -> None:
    run_world(2, "tests.distributed.overlap_scenarios.grown_dtensor", str(tmp_path), timeout_s=300)
