"""Elastic resume of `reckpt train`: a run checkpointed on N gloo processes continues on M.

The demo data carries a ``row_id`` column; with ``RECKPT_TRAIN_ROW_LOG`` set every rank logs
the row ids of each batch it trains. A killed run's batches count up to its last checkpoint's
step (what the resumed model holds); the resumed runs' batches count whole. Across the
restarts each pass must train every row exactly once.

The runs train through TorchRec's pipeline (the default), which reads two batches ahead of the
one it trains: a checkpoint whose data position counted those would make the resumed run skip
them, and the exactly-once check would fail. The model has a sequence feature (an
``EmbeddingCollection`` table, row-wise sharded), resharded with the rest.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import reckpt
from reckpt.restore.inspection import read_part
from tests.distributed.launcher import run_world
from tests.helpers import assert_state_dicts_equal
from tests.helpers.trainer_runs import cli

ROWS, EPOCHS, EVERY, BATCH = 3001, 2, 10, 50


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 files of 1000, 1000 and 1001 rows in row groups of 128: ranks get uneven shares."""
    from reckpt.trainer.data import make_data

    root = tmp_path_factory.mktemp("data")
    make_data(str(root), rows=ROWS, eval_rows=600, files=3, row_group_size=128)
    return root


def write_config(path: Path, data: Path, model_dir: Path) -> str:
    path.write_text(
        f"""
model_dir = "{model_dir}"
[data]
train_input_path = "{data}/train"
eval_input_path = "{data}/eval"
dense_columns = ["d0", "d1", "d2", "d3"]
sparse_columns = ["s0", "s1", "s2"]
sequence_columns = ["h0"]
batch_size = {BATCH}
[model]
embedding_dim = 8
num_embeddings = 500
bottom_mlp = [16, 8]
top_mlp = [16, 1]
[train_config]
num_epochs = {EPOCHS}
save_checkpoints_steps = {EVERY}
learning_rate = 0.003
"""
    )
    return str(path)


def train(cfg: str, world: int, rows: Path, *flags: str, kill_at: int | None = None) -> str:
    """Run `reckpt train` on ``world`` processes, logging trained rows under ``rows``; its stderr."""
    env = {"RECKPT_TRAIN_ROW_LOG": str(rows)}
    if kill_at is not None:
        env["RECKPT_TRAIN_KILL_AT_STEP"] = str(kill_at)
    proc = cli("train", cfg, *flags, world=world, env=env)
    if kill_at is None:
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        assert proc.returncode != 0, "the run was to be killed"
    return proc.stderr


def trained(rows: Path, up_to_step: int | None = None) -> dict[int, list[int]]:
    """Per pass, the row ids trained by the logs under ``rows`` (steps <= ``up_to_step``)."""
    out: dict[int, list[int]] = defaultdict(list)
    for log in rows.glob("rows-rank*.txt"):
        for line in log.read_text().splitlines():
            step, epoch, *ids = (int(x) for x in line.split())
            if up_to_step is None or step <= up_to_step:
                out[epoch] += ids
    return out


def assert_exactly_once(*parts: dict[int, list[int]]) -> None:
    for epoch in range(EPOCHS):
        ids = sorted(i for part in parts for i in part.get(epoch, []))
        assert len(ids) == len(set(ids)), f"pass {epoch}: {len(ids) - len(set(ids))} rows trained twice"
        assert ids == list(range(ROWS)), f"pass {epoch}: {ROWS - len(set(ids))} rows never trained"


def eval_logloss(model_dir: Path) -> dict[int, float]:
    lines = (model_dir / "train_eval_result_v2.txt").read_text().splitlines()
    return {x["global_step"]: x["logloss"] for x in map(json.loads, lines)}


def checkpoint_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    path, _ = reckpt.latest_checkpoint(str(model_dir))
    assert path is not None
    out = {f"model/{k}": v for k, v in read_part(path, "model").items()}
    out.update(
        {f"opt/{k}": v for k, v in read_part(path, "optimizer").items() if isinstance(v, torch.Tensor)}
    )
    return out


def test_2_to_1(tmp_path: Path, data: Path) -> None:
    """Killed on 2 processes after step 17 (checkpoint 10), resumed on 1: what the two ranks
    left of their ranges is read once, the restored model is the checkpoint's, loss falls."""
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "a.toml", data, run)
    train(cfg, 2, tmp_path / "rows-a", kill_at=17)
    ckpt, step = reckpt.latest_checkpoint(str(run))
    assert step == EVERY and ckpt is not None
    state = json.loads((Path(ckpt) / "dataloader_state.json").read_text())
    # 11 batches of 50 rows: each rank read its 500 rows of file 0 and 50 of file 1
    assert state["__world_size__"] == 2 and sorted(v for k, v in state.items() if ":" in k) == [
        49,
        499,
        549,
        999,
    ]

    run_world(1, "tests.distributed.elastic_scenarios.restore_matches_checkpoint", cfg, ckpt)

    err = train(cfg, 1, tmp_path / "rows-b", "--continue-train")
    assert "the data position was written by 2 process(es); this run has 1" in err, err[-3000:]
    assert f"the {ROWS - (EVERY + 1) * BATCH * 2} rows of this pass not yet consumed" in err
    assert_exactly_once(trained(tmp_path / "rows-a", up_to_step=EVERY), trained(tmp_path / "rows-b"))
    final = reckpt.restore_dataloader_state(str(reckpt.latest_checkpoint(str(run))[0]))
    assert final is not None and final["__epochs_completed__"] == EPOCHS and final["__world_size__"] == 1
    loss = eval_logloss(run)
    assert loss[max(loss)] < loss[EVERY], loss


def test_1_to_2_to_3_and_a_same_size_resume_after_a_redivision(tmp_path: Path, data: Path) -> None:
    """1 process (killed after 17, checkpoint 10) -> 2 (killed after 27, checkpoint 20: a
    re-divided pass) -> 3 to the end: every row once per pass. And the 2-process leg resumed
    on 2 again ends bitwise equal to that leg run without the kill."""
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "a.toml", data, run)
    train(cfg, 1, tmp_path / "rows-a", kill_at=17)
    assert reckpt.latest_checkpoint(str(run))[1] == EVERY
    straight = tmp_path / "straight"
    shutil.copytree(run, straight)

    err = train(cfg, 2, tmp_path / "rows-b", "--continue-train", kill_at=27)
    assert "the data position was written by 1 process(es); this run has 2" in err, err[-3000:]
    ckpt, step = reckpt.latest_checkpoint(str(run))
    assert step == 2 * EVERY and ckpt is not None
    again = tmp_path / "again"
    shutil.copytree(run, again)

    run_world(3, "tests.distributed.elastic_scenarios.restore_matches_checkpoint", cfg, ckpt)
    err = train(cfg, 3, tmp_path / "rows-c", "--continue-train")
    assert "the data position was written by 2 process(es); this run has 3" in err, err[-3000:]
    assert_exactly_once(
        trained(tmp_path / "rows-a", up_to_step=EVERY),
        trained(tmp_path / "rows-b", up_to_step=2 * EVERY),
        trained(tmp_path / "rows-c"),
    )
    loss = eval_logloss(run)
    assert loss[max(loss)] < loss[2 * EVERY] < loss[EVERY], loss

    # The 2-process leg: uninterrupted, and killed after 27 then resumed on 2 from checkpoint 20.
    train(write_config(tmp_path / "s.toml", data, straight), 2, tmp_path / "rows-s", "--continue-train")
    err = train(write_config(tmp_path / "g.toml", data, again), 2, tmp_path / "rows-g", "--continue-train")
    assert reckpt.latest_checkpoint(str(again))[1] == reckpt.latest_checkpoint(str(straight))[1]
    assert_state_dicts_equal(checkpoint_tensors(straight), checkpoint_tensors(again))
    assert_exactly_once(
        trained(tmp_path / "rows-a", up_to_step=EVERY),
        trained(tmp_path / "rows-b", up_to_step=2 * EVERY),
        trained(tmp_path / "rows-g"),
    )
