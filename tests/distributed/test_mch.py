"""Managed-collision (MCH / ZCH) state saved and restored at world sizes 1, 2 and 4 (gloo)."""

from __future__ import annotations

from pathlib import Path

from tests.distributed import mch_scenarios
from tests.distributed.launcher import run_world

TARGET = "tests.distributed.mch_scenarios.steps"


def test_managed_collision_state_same_shrink_grow_and_refusal(tmp_path: Path) -> None:
    """2->2 and 2->1 load positionally; 1->2 and 2->4 redistribute ids with their rows; a
    checkpoint whose ids cannot fit the new layout is refused before any buffer changes."""
    root = str(tmp_path)
    run_world(2, TARGET, root, [("save", "w2", False)], timeout_s=300)
    run_world(
        1,
        TARGET,
        root,
        [("save", "w1", False), ("save", "w1c", True), ("restore_exact", "w2")],
        timeout_s=300,
    )
    run_world(
        2,
        TARGET,
        root,
        [("restore_exact", "w2"), ("restore_exact", "w1"), ("restore_refuses_crowded", "w1c")],
        timeout_s=300,
    )
    run_world(4, TARGET, root, [("restore_exact", "w2")], timeout_s=300)
    mch_scenarios.check_unsharded(root, "w2")  # 2 -> a plain module, no process group
