"""The trainer on TorchRec's ``TrainPipelineSparseDist`` (CPU, gloo): same training as the plain
loop, positions of trained batches only, delta checkpoints that see every row.

The row-id audit of kills and resumes under the pipeline is ``test_elastic.py`` (its runs are
pipelined); resumes across the two loops are ``test_trainer.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import reckpt
from tests.distributed.launcher import run_world
from tests.helpers.trainer_runs import STEPS, cli, write_config


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1001 train rows in 2 files: with batches of 50 on 2 ranks, one rank pads each pass."""
    from reckpt.trainer.data import make_data

    root = tmp_path_factory.mktemp("data")
    make_data(str(root), rows=1001, eval_rows=300, files=2, row_group_size=128)
    return root


def test_pipelined_steps_equal_plain_steps(data: Path) -> None:
    run_world(2, "tests.distributed.pipeline_scenarios.pipelined_equals_plain", str(data))


def test_delta_chain_of_a_pipelined_async_run_equals_the_full_checkpoint(tmp_path: Path) -> None:
    """Deltas written asynchronously by a pipelined run on 2 processes (bags, a sequence feature):
    each restored through its chain equals, bitwise, the full checkpoint that a run without
    deltas (and without the pipeline) wrote at the same step. The row tracker's hooks see every
    batch the pipeline trains, or a delta would miss rows."""
    from reckpt.trainer.data import make_data

    make_data(str(tmp_path / "data"), rows=8000, eval_rows=1000)
    deltas, fulls = tmp_path / "deltas", tmp_path / "fulls"
    train = "async_save = true\nincremental_full_every = 3\nincremental_max_delta_fraction = 1.0"
    cfg = write_config(tmp_path / "d.toml", tmp_path / "data", deltas, train=train)
    proc = cli("train", cfg, world=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    infos = reckpt.list_checkpoints(str(deltas))
    assert [(c.step, c.kind) for c in infos] == [(20, "full"), (40, "delta"), (STEPS - 1, "delta")]
    assert "save " in proc.stderr and "(delta): " in proc.stderr and "(async, training blocked" in proc.stderr
    full_cfg = write_config(tmp_path / "f.toml", tmp_path / "data", fulls, train="pipeline = false")
    proc = cli("train", full_cfg, world=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in (40, STEPS - 1):
        run_world(
            2,
            "tests.distributed.pipeline_scenarios.chain_matches_full",
            cfg,
            str(deltas / f"model.delta-{step}"),
            str(fulls / f"model.ckpt-{step}"),
        )
