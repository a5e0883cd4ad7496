"""The benchmarks run at a tiny size in CI so they cannot rot (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from benchmarks import async_stall, targets

from tests.helpers.paths import REPO

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG


def test_async_stall_benchmark_tiny(tmp_path) -> None:
    figures = async_stall.main(["--size-mb", "2", "--repeats", "1", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "async_stall.json").read_text())
    assert doc["figures"] == figures
    assert {"command", "git_revision", "host"} <= doc["provenance"].keys()
    assert figures["sync_save_s"] > 0 and figures["async_stall_s"] > 0 and figures["fork_stall_s"] > 0
    runs = doc["runs"]
    assert len(runs["copy"]["rewrite"]) == len(runs["fork"]["sparse"]) == 1  # both modes, both writes
    assert (tmp_path / "async_stall.md").read_text().startswith("# async_stall")
    assert _is_png(tmp_path / "async_stall.png")


def test_save_restore_benchmark_tiny(tmp_path) -> None:
    """The trainer's sharded model on 2 gloo processes, every baseline, at a tiny size."""
    from benchmarks import save_restore

    argv = ["--size-mb", "2", "--procs", "2", "--repeats", "1", "--pause", "0"]
    doc = save_restore.main([*argv, "--out", str(tmp_path), "--workdir", str(tmp_path), "--name", "sr"])
    saved = json.loads((tmp_path / "sr.json").read_text())
    assert saved["ratios"] == doc["ratios"] and saved["state_bytes"] > 0
    assert len(saved["per_rank_bytes"]) == 2 and all(b > 0 for b in saved["per_rank_bytes"])
    assert {
        "raw write",
        "raw read",
        "torch.save",
        "safetensors save",
        "DCP save (thread_count=1)",
        "DCP load (TorchEasyRec)",
        "reckpt save",
        "reckpt restore (verified)",
        "reckpt restore (verify='first')",
    } <= set(saved["median_seconds"])
    assert all(v > 0 for k, v in saved["ratios"].items() if "checksum" not in k)
    assert (tmp_path / "sr.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("reckpt-sr-")]  # cleaned up


def test_delta_benchmark_tiny(tmp_path) -> None:
    from benchmarks import delta

    doc = delta.main(
        [
            "--rows",
            "4000",
            "--dense-mb",
            "0.05",
            "--repeats",
            "1",
            "--out",
            str(tmp_path),
            "--workdir",
            str(tmp_path),
        ]
    )
    saved = json.loads((tmp_path / "delta.json").read_text())
    assert [r["fraction"] for r in saved["rows"]] == [0.01, 0.05, 0.10, 0.25]
    small, large = saved["rows"][0], saved["rows"][-1]
    assert 0 < small["delta_bytes"] < large["delta_bytes"] < large["full_bytes"]
    assert doc["targets_at_5pct"]["bytes_ratio"] > 1
    assert _is_png(tmp_path / "delta.png")


def test_reshard_load_benchmark_tiny(tmp_path) -> None:
    from benchmarks import reshard_load

    doc = reshard_load.main(
        ["--rows", "2000", "--repeats", "1", "--out", str(tmp_path), "--workdir", str(tmp_path)]
    )
    saved = json.loads((tmp_path / "reshard_load.json").read_text())
    assert saved["ratios"] == doc["ratios"]
    assert {"restore 2 -> 2", "restore 1 -> 1", "restore 2 -> 1"} <= set(saved["median_seconds"])
    assert _is_png(tmp_path / "reshard_load.png")


def test_suite_runs_the_selected_benchmarks_and_summarises_the_targets(tmp_path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, "-m", "benchmarks", "--size", "tiny", "--only", "async_stall,delta"]
    cmd += ["--out", str(out), "--workdir", str(work)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("async_stall", "delta"):
        assert json.loads((out / f"{name}.json").read_text())["provenance"]["git_revision"]
        assert (out / f"{name}.md").read_text().startswith(f"# {name}")
        assert _is_png(out / f"{name}.png")
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "summary.md").read_text().startswith("# benchmark suite (tiny)")
    assert summary["size"] == "tiny" and summary["errors"] == []
    assert {"command", "git_revision", "host"} <= summary["provenance"].keys()
    assert [b["name"] for b in summary["benchmarks"]] == ["async_stall", "delta"]
    for b in summary["benchmarks"]:
        assert b["status"] == "ok" and b["wall_s"] > 0
        assert b["files"] == [f"{b['name']}.json", f"{b['name']}.md", f"{b['name']}.png"]
    rows = summary["targets"]
    assert {r["benchmark"] for r in rows} == {"async_stall", "delta"}
    assert {r["key"] for r in rows} == {"stall_over_sync", "fork_stall_over_sync", "bytes_ratio", "speedup"}
    for r in rows:
        assert isinstance(r["ratio"], float) and r["target"][:2] in (">=", "<=")
        assert r["pass"] in (True, False) and r["status"] == ("pass" if r["pass"] else "fail")
    if summary["chart"]:
        assert _is_png(out / "summary.png")
    assert not list(work.iterdir())  # each benchmark's work folder is deleted


def test_suite_selects_runs_and_matches_ratio_keys_by_prefix() -> None:
    from benchmarks import suite

    full = suite.plan("full")
    assert [r.name for r in suite.select(full, "save_restore")] == [
        f"save_restore_{gb}gb_{p}p" for gb in (1, 4) for p in (1, 2)
    ]
    assert [r.name for r in suite.select(full, "reliability,save_restore_4gb_2p")] == [
        "save_restore_4gb_2p",
        "reliability",
    ]
    with pytest.raises(ValueError, match="nope"):
        suite.select(full, "nope")
    doc = {"ratios": {"save / raw write (target >= 0.8)": 0.9, "checksum cost: hashing / save": 0.2}}
    rows = {r["figure"]: r for r in targets.evaluate("sr", "save_restore", [doc], None)}
    assert rows["save throughput / raw write"]["ratio"] == 0.9
    assert rows["save throughput / raw write"]["pass"] is True
    assert rows["checksum cost (hashing not hidden by I/O) / save time"]["status"] == "fail"
    missing = rows["peak extra RSS during save / state"]
    assert missing["status"] == "missing" and missing["ratio"] is None and missing["pass"] is None
    failed = targets.evaluate("sr", "save_restore", [], "RuntimeError: boom")
    assert {r["status"] for r in failed} == {"error"}
    # an exact key wins over a longer key that starts with it
    assert targets.lookup({"t": {"bytes_ratio_target": 15, "bytes_ratio": 3}}, [("t",)], "bytes_ratio") == (
        "bytes_ratio",
        3.0,
    )


def test_scaling_reads_the_suites_save_restore_results(tmp_path) -> None:
    """1 GB -> 4 GB: constant throughput scales 1.0, a fixed cost amortises below 1."""
    from benchmarks import scaling

    for gb, secs in ((1, {"reckpt save": 1.0, "reckpt restore (verified)": 2.0}), (4, None)):
        med = secs or {"reckpt save": 4.0, "reckpt restore (verified)": 5.0}
        doc = {
            "state_bytes": gb * 10**9,
            "median_seconds": med,
            "gb_per_s": {k: gb / v for k, v in med.items()},
            "ratios": {"save / raw write (target >= 0.8)": 0.9 if gb == 1 else 0.95},
        }
        (tmp_path / f"save_restore_{gb}gb_1p.json").write_text(json.dumps(doc))
    doc = scaling.main(["--results", str(tmp_path)])
    rows = doc["by_procs"]["1p"]["figures"]
    assert rows["reckpt save"]["scaling"] == 1.0
    assert rows["reckpt restore (verified)"]["scaling"] == 5.0 / 8.0
    assert "2p" not in doc["by_procs"]
    assert (tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"
