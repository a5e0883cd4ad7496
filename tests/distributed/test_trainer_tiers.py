"""The reference trainer with checkpoint tiers, under TorchRec's pipeline, on 2 processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import reckpt
from reckpt.restore.inspection import read_part
from tests.helpers import assert_state_dicts_equal
from tests.helpers.trainer_runs import STEPS, cli, write_config

TIERS = """
[[train_config.checkpoint_tiers]]
name = "memory"
url = "{memory}"
every_steps = 5
keep = 1
[[train_config.checkpoint_tiers]]
name = "durable"
every_steps = 20
keep_best = true
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    proc = cli("make-data", "--out", str(root), "--rows", "8000", "--eval-rows", "2000")
    assert proc.returncode == 0, proc.stderr
    return root


def final_state(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {f"model/{k}": v for k, v in read_part(str(ckpt), "model").items()}
    opt = read_part(str(ckpt), "optimizer")
    out.update({f"optimizer/{k}": v for k, v in opt.items() if isinstance(v, torch.Tensor)})
    return out


def committed(root: Path) -> list[int]:
    return [c.step for c in reckpt.list_checkpoints(str(root)) if c.committed]


def test_a_killed_pipelined_run_resumes_from_the_memory_tier_bitwise(tmp_path: Path, data: Path) -> None:
    straight = tmp_path / "straight"
    assert cli("train", write_config(tmp_path / "a.toml", data, straight), world=2).returncode == 0

    memory, model_dir = tmp_path / "memory", tmp_path / "tiered"
    train = "async_save = true\n" + TIERS.format(memory=memory)
    cfg = write_config(tmp_path / "b.toml", data, model_dir, every=None, train=train)
    killed = cli("train", cfg, world=2, env={"RECKPT_TRAIN_KILL_AT_STEP": "47"})
    assert killed.returncode != 0
    # Every 5 steps into memory (keep 1), every 20 also to model_dir by the persister.
    assert committed(memory)[-1] in (40, 45), committed(memory)
    assert "tier memory" in killed.stderr, killed.stderr[-3000:]

    proc = cli("train", cfg, "--continue-train", world=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed_at = committed(memory)  # keep 1: the final step only
    assert resumed_at == [STEPS - 1]
    restored = f"restore {memory}/model.ckpt-" in proc.stderr and "tier memory" in proc.stderr
    assert restored, proc.stderr[-3000:]
    # The last save goes to every tier; model_dir got every 20th step from the persister.
    assert committed(model_dir) == [20, 40, STEPS - 1]
    name = f"model.ckpt-{STEPS - 1}"
    assert_state_dicts_equal(final_state(straight / name), final_state(model_dir / name))
    assert_state_dicts_equal(final_state(memory / name), final_state(model_dir / name))
    # An eval follows the saves that reach model_dir only (20, 40 and the last).
    results = (model_dir / "train_eval_result_v2.txt").read_text().splitlines()
    evals = [json.loads(x)["global_step"] for x in results]
    assert evals == [20, 40, STEPS - 1]
    saves = [json.loads(x) for x in (model_dir / "train_log.jsonl").read_text().splitlines()]
    tiers = {r["tier"] for r in saves if r.get("event") == "save"}
    assert tiers == {"memory"}, tiers


def test_a_tiered_run_resumes_on_another_number_of_processes(tmp_path: Path, data: Path) -> None:
    """Killed on 2 processes, resumed on 1: the memory tier's copy is resharded (DCP), the rows
    of the pass not trained yet are re-divided (the exactly-once audit is test_elastic.py)."""
    memory, model_dir = tmp_path / "memory", tmp_path / "tiered"
    cfg = write_config(tmp_path / "b.toml", data, model_dir, every=None, train=TIERS.format(memory=memory))
    killed = cli("train", cfg, world=2, env={"RECKPT_TRAIN_KILL_AT_STEP": "33"})
    assert killed.returncode != 0 and committed(memory) == [30], committed(memory)

    proc = cli("train", cfg, "--continue-train", world=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    restored = f"restore {memory}/model.ckpt-30: " in proc.stderr and "tier memory" in proc.stderr
    assert restored, proc.stderr[-3000:]
    assert "saved by 2 process(es), this run has 1" in proc.stderr
    assert committed(model_dir) == [20, 40, STEPS - 1] and committed(memory) == [STEPS - 1]
    state = json.loads((model_dir / f"model.ckpt-{STEPS - 1}" / "dataloader_state.json").read_text())
    assert state["__world_size__"] == 1


def test_tier_settings_that_conflict_are_named(tmp_path: Path, data: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", data, tmp_path / "m", train=TIERS.format(memory=tmp_path / "mem"))
    proc = cli("train", cfg)
    assert proc.returncode != 0 and "remove train_config.save_checkpoints_steps" in proc.stderr, proc.stderr
    other = TIERS.format(memory=tmp_path / "mem") + f'url = "{tmp_path / "elsewhere"}"\n'
    cfg = write_config(tmp_path / "d.toml", data, tmp_path / "m", every=None, train=other)
    proc = cli("train", cfg)
    assert proc.returncode != 0 and "must be model_dir" in proc.stderr, proc.stderr
