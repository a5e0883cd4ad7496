"""Delta checkpoints of sharded TorchRec tables: saved on 2 gloo processes, restored on 2 and 1."""

from __future__ import annotations

from tests.distributed.launcher import run_world


def test_delta_chain_of_sharded_tables_restores_bitwise_at_any_world_size(tmp_path) -> None:
    run_world(2, "tests.distributed.delta_scenarios.save_chain", str(tmp_path), timeout_s=400)
    run_world(1, "tests.distributed.delta_scenarios.restore_chain", str(tmp_path), timeout_s=300)
