"""``benchmarks/tiers.py`` at a tiny size, so that it cannot rot (no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import tiers


def test_tiers_benchmark_tiny(tmp_path: Path) -> None:
    argv = ["--size-mb", "8", "--procs", "2", "--repeats", "1", "--kills", "1", "--no-s3"]
    argv += ["--train-steps", "40", "--mem-every", "5", "--local-every", "10", "--durable-every", "20"]
    argv += [
        "--step-ms",
        "2",
        "--workdir",
        str(tmp_path / "work"),
        "--shm",
        str(tmp_path),
        "--out",
        str(tmp_path),
    ]
    doc = tiers.main(argv)
    saved = json.loads((tmp_path / "tiers.json").read_text())
    assert saved["ratios"] == doc["ratios"] and set(saved["met"]) == {
        "blocking",
        "restart",
        "lost",
        "throughput",
    }
    assert all(v > 0 for k, v in saved["ratios"].items() if not k.startswith("steps lost"))
    assert saved["runs"]["restart_tier"] == {"memory": ["memory"], "local": ["local"], "durable": ["durable"]}
    assert 0 <= saved["runs"]["steps_lost"][0] <= 2 * 5  # the save in flight may not have committed
    assert (tmp_path / "tiers.md").read_text().startswith("# tiers")
    assert (tmp_path / "tiers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
