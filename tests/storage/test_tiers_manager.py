"""A manager with tiers, in one process, on real storage: cadence, retention, restart, a killed trainer."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

import reckpt
from reckpt.commit.state import checkpoint_state
from reckpt.errors import ConfigError
from reckpt.lifecycle.tiered import TieredResumeInfo
from reckpt.storage.core import storage_for
from reckpt.tiers.config import Tier, TierSet
from reckpt.tiers.control import Control
from tests.helpers import flip_bit, fresh, state_dicts_equal, train
from tests.helpers.processes import reckpt_cli, run_worker


def _tiers(tmp_path: Path, durable: str) -> list[Tier]:
    return [
        Tier("memory", str(tmp_path / "mem"), 2, keep=1),
        Tier("local", str(tmp_path / "local"), 4, keep=2),
        Tier("durable", durable, 8, keep=2, shared=True),
    ]


def _steps(url: str) -> list[int]:
    st = storage_for(url)
    names = [n for n in st.ls(url) if n.startswith("model.ckpt-")]
    return sorted(int(n.split("-")[1]) for n in names if checkpoint_state(st, f"{url}/{n}") == "committed")


def _wait_persister_gone(tiers: list[Tier], timeout_s: float = 120.0) -> None:
    control = Control(TierSet(tiers).control_dir)
    deadline = time.monotonic() + timeout_s
    while control.persister_running():
        assert time.monotonic() < deadline, "the persister did not exit"
        time.sleep(0.05)


def _run(tiers: list[Tier], model_dir: str, steps: int, hook: Any = None) -> dict[int, dict[str, Any]]:
    """Train ``steps`` steps saving with the tiers; the model's state at every step."""
    m, o = fresh(seed=1)
    states = {}
    with reckpt.CheckpointManager(model_dir, tiers=tiers, async_save=True) as mgr:
        for step in range(1, steps + 1):
            train(m, o, steps=1, seed=step)
            mgr.maybe_save(step, m, o)
            states[step] = copy.deepcopy(m.state_dict())
            if hook is not None:
                hook(mgr, step)
    _wait_persister_gone(tiers)
    return states


@pytest.fixture(params=["folder", "s3"])
def durable(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "folder":
        return str(tmp_path / "durable")
    return str(request.getfixturevalue("s3_root")) + "/durable"


def test_each_tier_gets_its_cadence_and_keeps_its_own(tmp_path: Path, durable: str) -> None:
    tiers = _tiers(tmp_path, durable)
    _run(tiers, durable, 17)
    assert _steps(tiers[0].url) == [16]
    assert _steps(tiers[1].url) == [12, 16]
    assert _steps(tiers[2].url) == [8, 16]
    for t in tiers:
        for step in _steps(t.url):
            assert reckpt.verify(t.checkpoint_dir(step)).ok
    assert Control(TierSet(tiers).control_dir).pending() == []


def test_restart_reads_the_fastest_copy_and_falls_back(tmp_path: Path) -> None:
    tiers = _tiers(tmp_path, str(tmp_path / "durable"))
    states = _run(tiers, str(tmp_path / "durable"), 16)

    def resume() -> TieredResumeInfo:
        m, o = fresh(seed=7)
        with reckpt.CheckpointManager(str(tmp_path / "durable"), tiers=tiers) as mgr:
            info = mgr.restore_latest(m, o)
        assert isinstance(info, TieredResumeInfo)
        assert state_dicts_equal(m.state_dict(), states[info.step])
        return info

    info = resume()
    assert (info.step, info.tier, info.sources) == (16, "memory", ("memory",))
    shutil.rmtree(tiers[0].checkpoint_dir(16))
    assert (resume().step, resume().tier) == (16, "local")
    flip_bit(tiers[1].checkpoint_dir(16))  # found as the restore reads it: the next copy is tried
    assert (resume().step, resume().tier) == (16, "durable")
    shutil.rmtree(tiers[2].checkpoint_dir(16))
    assert (resume().step, resume().tier) == (12, "local")


def test_retention_leaves_what_reckpt_did_not_write(tmp_path: Path) -> None:
    tiers = _tiers(tmp_path, str(tmp_path / "durable"))
    for t in tiers:
        os.makedirs(t.url, exist_ok=True)
        Path(t.url, "notes.txt").write_text("mine")

    def annotate(mgr: reckpt.CheckpointManager, step: int) -> None:
        if step in (2, 4):
            mgr.wait()
            Path(tiers[0].checkpoint_dir(step), "notes.txt").write_text(f"about step {step}")

    _run(tiers, str(tmp_path / "durable"), 12, annotate)
    assert _steps(tiers[0].url) == [12]
    for t in tiers:
        assert Path(t.url, "notes.txt").read_text() == "mine"
    for step in (2, 4):  # pruned: only the foreign file is left, byte for byte
        assert sorted(os.listdir(tiers[0].checkpoint_dir(step))) == ["notes.txt"]
        assert Path(tiers[0].checkpoint_dir(step), "notes.txt").read_text() == f"about step {step}"


def test_a_final_save_reaches_every_tier(tmp_path: Path) -> None:
    tiers = _tiers(tmp_path, str(tmp_path / "durable"))
    m, o = fresh(seed=1)
    with reckpt.CheckpointManager(str(tmp_path / "durable"), tiers=tiers) as mgr:
        for step in range(1, 6):
            train(m, o, steps=1, seed=step)
            mgr.maybe_save(step, m, o, final=step == 5)
    _wait_persister_gone(tiers)
    assert _steps(tiers[2].url) == [5] and _steps(tiers[1].url) == [4, 5]


def test_the_persister_outlives_a_killed_trainer(tmp_path: Path, s3_root: str) -> None:
    tiers = _tiers(tmp_path, f"{s3_root}/durable")
    out = tmp_path / "out"
    out.mkdir()
    cfg = {
        "tiers": [t.to_json() for t in tiers],
        "model_dir": f"{s3_root}/durable",
        "steps": 12,
        "rows": 200_000,
        "dim": 16,
        "kill": {"step": 8, "ranks": [0], "after_commit": True},
        "out": str(out),
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    done = run_worker("tests.distributed.tiers_scenarios", "solo", str(tmp_path / "cfg.json"))
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert json.loads((out / "killed-rank0.json").read_text()) == [8]  # not promoted yet when it died
    _wait_persister_gone(tiers)
    assert _steps(tiers[2].url) == [8]
    assert reckpt.verify(tiers[2].checkpoint_dir(8)).ok
    log = Path(TierSet(tiers).control_dir, "persister.log").read_text()
    assert "the trainer is gone and nothing is pending" in log


def test_tiers_replace_the_managers_own_cadence_and_retention(tmp_path: Path) -> None:
    tiers = _tiers(tmp_path, str(tmp_path / "durable"))
    for kwargs in ({"keep_checkpoint_max": 3}, {"save_steps": 10}):
        with pytest.raises(ConfigError, match="tiers= sets the cadence"):
            reckpt.CheckpointManager(str(tmp_path / "durable"), tiers=tiers, **kwargs)


def test_the_cli_lists_tiers_side_by_side_and_verifies_each(tmp_path: Path) -> None:
    tiers = _tiers(tmp_path, str(tmp_path / "durable"))
    _run(tiers, str(tmp_path / "durable"), 9)
    urls = [t.url for t in tiers]
    done = reckpt_cli("ls", *urls, "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["model_dirs"] == urls
    copies = {row["step"]: row["copies"] for row in doc["steps"]}
    assert copies == {8: {u: "committed" for u in urls}, 4: {urls[1]: "committed"}}
    text = reckpt_cli("ls", *urls).stdout.splitlines()
    assert text[0].split() == ["step", *urls] and text[1].split() == [
        "8",
        "committed",
        "committed",
        "committed",
    ]
    for url in urls:
        assert reckpt_cli("verify", url).returncode == 0
