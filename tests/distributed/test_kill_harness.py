"""Crash injection by storage-operation index (CI subset of ``python -m benchmarks.reliability``)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from benchmarks import reliability

import reckpt
from reckpt.testing.kill_points import op_phase
from tests.helpers.processes import run_worker


def test_op_knob_kills_just_before_operation_k(tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    env = {"RECKPT_FAULT_KILL_AT": "op:5", "RECKPT_FAULT_TRACE": str(trace)}
    root = tmp_path / "run"
    proc = run_worker("tests.distributed.crash_worker", str(root), "2", env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ops = [line.split("\t") for line in trace.read_text().splitlines()]
    assert [int(k) for k, _, _ in ops] == list(range(1, 6))
    kind, path = ops[-1][1], ops[-1][2]
    assert op_phase(kind, path) == "data" and path.endswith(".distcp")  # killed before writing it
    assert not os.path.exists(path)
    assert reckpt.latest_checkpoint(str(root)) == (None, -1)


def test_fixed_seed_subset(tmp_path: Path) -> None:
    """About 30 kills over every scenario (sync/async, 1/2 processes, local/s3): nothing lost."""
    doc = reliability.main(["--kills", "32", "--seed", "0", "--out", str(tmp_path)])
    summary = doc["summary"]
    kills = doc["sections"]["crash injection"]["total"]
    failures = {name: sec.get("failures") for name, sec in doc["sections"].items() if sec.get("failures")}
    failures["crash injection"] = kills["failures"]
    assert summary["checkpoints_lost"] == 0 and summary["failures"] == 0, failures
    assert kills["kills"] >= 30 and kills["handled"] == kills["kills"]
    assert set(doc["sections"]["crash injection"]["by_scenario"]) == {
        f"{b}/{m}/{w}p" for b in ("local", "s3") for m in ("sync", "async") for w in (1, 2)
    }
    for phase in ("data", "fsync", "manifest", "commit", "prune", "sidecar"):
        assert kills["by_phase"][phase] >= 1, (phase, kills["by_phase"])
    assert kills["debris_left"] == 0 and kills["restored_bit_exact"] == kills["kills"]
    assert kills["foreign_lost"] == 0 and kills["foreign_checked"] >= 4 * kills["kills"]
    assert json.loads((tmp_path / "reliability.json").read_text())["summary"] == summary
    assert (tmp_path / "reliability.md").read_text().startswith("# reliability")
    assert (tmp_path / "reliability.png").read_bytes()[:4] == b"\x89PNG"
