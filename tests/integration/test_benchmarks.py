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
    """The trainer's sharded model on 2 gloo processes, every baseline and ceiling variant, tiny."""
    from benchmarks import ceiling, save_restore

    argv = ["--size-mb", "2", "--procs", "2", "--repeats", "2", "--pause", "0"]
    doc = save_restore.main([*argv, "--out", str(tmp_path), "--workdir", str(tmp_path), "--name", "sr"])
    saved = json.loads((tmp_path / "sr.json").read_text())
    assert saved["ratios"] == doc["ratios"] and saved["state_bytes"] > 0
    assert len(saved["per_rank_bytes"]) == 2 and all(b > 0 for b in saved["per_rank_bytes"])
    modes = ceiling.MODES if saved["ceiling"]["o_direct"] == "supported" else ceiling.MODES[:2]
    raw = {ceiling.write_name(s, m) for s in ceiling.STREAMS for m in modes}
    raw |= {ceiling.read_name(s) for s in ceiling.STREAMS}
    assert raw | {
        "torch.save",
        "torch.load",
        "safetensors save",
        "DCP save (thread_count=1)",
        "DCP load (TorchEasyRec)",
        "reckpt save",
        "reckpt save (no checksums)",
        "reckpt save (async, copy)",
        "reckpt save (async, fork)",
        "reckpt restore (verified)",
        "reckpt restore (verify=False)",
        "reckpt restore (verify='first')",
    } <= set(saved["median_seconds"])
    assert all(len(v) == 2 for v in saved["runs"].values())  # every figure in every round
    assert set(saved["peak_extra_rss_bytes"]) == set(saved["median_seconds"])  # every mode's memory
    assert saved["ceiling"]["write"].startswith("raw write") and saved["ceiling"]["read"].startswith(
        "raw read"
    )
    keys = list(saved["ratios"])
    for start in (
        "save / write ceiling",
        "restore verified / read ceiling",
        "checksum cost A/B",
        "verify cost A/B",
    ):
        assert any(k.startswith(start) for k in keys), start
    assert saved["measurement_errors"] == [k for k, v in saved["ratios"].items() if "ceiling" in k and v > 1]
    rows = targets.evaluate("sr", "save_restore", [saved], None)
    assert {r["status"] for r in rows} <= {"pass", "fail", targets.MEASUREMENT_ERROR}
    assert (tmp_path / "sr.png").read_bytes()[:4] == b"\x89PNG"
    assert saved["provenance"]["git_revision"] in (tmp_path / "sr.md").read_text()
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
    from benchmarks import suite

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
    ran = [b for b in summary["benchmarks"] if b["status"] != "not run"]
    assert [b["name"] for b in ran] == ["async_stall", "delta"]
    for b in ran:
        assert (
            b["status"] == "ok" and b["wall_s"] > 0 and b["revision"] == summary["provenance"]["git_revision"]
        )
        assert b["files"] == [f"{b['name']}.json", f"{b['name']}.md", f"{b['name']}.png"]
    # every run of the plan is listed, and every target: the others as not run
    assert {b["name"] for b in summary["benchmarks"]} == {r.name for r in suite.plan("tiny")}
    rows = summary["targets"]
    assert {r["benchmark"] for r in rows} >= {
        r.name for r in suite.plan("tiny") if r.module != "dynamic_table"
    }
    measured = [r for r in rows if r["benchmark"] in ("async_stall", "delta")]
    assert {r["key"] for r in measured} == {
        "stall_over_sync",
        "fork_stall_over_sync",
        "bytes_ratio",
        "speedup",
    }
    for r in measured:
        assert isinstance(r["ratio"], float) and r["target"][:2] in (">=", "<=")
        assert r["pass"] in (True, False) and r["status"] == ("pass" if r["pass"] else "fail")
    assert {r["status"] for r in rows if r not in measured} == {"not run"}
    if summary["chart"]:
        assert _is_png(out / "summary.png")
    assert not list(work.iterdir())  # each benchmark's work folder is deleted


def test_suite_selects_runs_and_matches_ratio_keys_by_prefix() -> None:
    from benchmarks import suite

    full = suite.plan("full")
    assert [r.name for r in suite.select(full, "save_restore")] == [
        f"save_restore_{gb}gb_{p}p" for gb in (1, 4, 8) for p in (1, 2, 4)
    ]
    assert all("--repeats" in r.argv and r.argv[r.argv.index("--repeats") + 1] == "5" for r in full[:9])
    assert [r.name for r in suite.select(full, "reliability,save_restore_4gb_2p")] == [
        "save_restore_4gb_2p",
        "reliability",
    ]
    assert {r.module for r in full} >= {"dynamic_table", "unsharded_load", "async_stall", "delta", "tiers"}
    with pytest.raises(ValueError, match="nope"):
        suite.select(full, "nope")
    doc = {
        "ratios": {
            "save / raw write, 1 stream (target >= 0.8)": 0.9,
            "checksum cost: hashing not hidden by I/O / save": 0.2,
            "save / write ceiling [raw write (2 streams, O_DIRECT)] (target >= 0.9)": 1.2,
            "restore verified / read ceiling [raw read (4 streams)] (target >= 0.9)": 0.95,
            "save / DCP default (thread_count=1) (target > 1)": 1.0,
        },
        "ratios_not_measured": {"restore verified / torch.load (target > 1)": "not measured: torch.load"},
    }
    rows = {r["figure"]: r for r in targets.evaluate("sr", "save_restore", [doc], None)}
    assert rows["save throughput / raw write (1 stream)"]["ratio"] == 0.9
    assert rows["save throughput / raw write (1 stream)"]["pass"] is True
    assert rows["checksum cost (hashing not hidden by I/O) / save time"]["status"] == "fail"
    error = rows["save throughput / write ceiling"]  # above 1.0 against the disk: not a result
    assert error["status"] == targets.MEASUREMENT_ERROR and error["pass"] is None
    assert rows["verified restore throughput / read ceiling"]["status"] == "pass"
    assert rows["save faster than plain DCP (TorchEasyRec)"]["status"] == "fail"  # "faster": > 1
    skipped = rows["verified restore faster than torch.load"]
    assert skipped["status"] == "not measured" and "torch.load" in skipped["note"]
    missing = rows["peak extra RSS during save / state"]
    assert missing["status"] == "missing" and missing["ratio"] is None and missing["pass"] is None
    failed = targets.evaluate("sr", "save_restore", [], "RuntimeError: boom")
    assert {r["status"] for r in failed} == {"error"}
    # an exact key wins over a longer key that starts with it
    assert targets.lookup({"t": {"bytes_ratio_target": 15, "bytes_ratio": 3}}, [("t",)], "bytes_ratio") == (
        "bytes_ratio",
        3.0,
    )
    # targets a benchmark declares itself are listed too
    declared = {
        "targets": [{"figure": "rows in one process", "value": 5e7, "target": ">= 5e+07", "met": True}]
    }
    (row,) = targets.evaluate("dynamic_table", "dynamic_table", [declared], None)
    assert (row["figure"], row["status"], row["target"]) == ("rows in one process", "pass", ">= 5e+07")
    summary = {
        "size": "tiny",
        "provenance": {"command": "c", "git_revision": "abc1234-dirty", "host": "h", "cpus": 2, "time": "t"},
        "wall_s": 1.0,
        "counts": {s: sum(r["status"] == s for r in rows.values()) for s in targets.STATUSES},
        "errors": [],
        "targets": list(rows.values()),
        "benchmarks": [],
    }
    text = targets.markdown(summary)
    assert "abc1234-dirty" in text and "| measurement error (above 1.0 against the disk's ceiling) |" in text


def test_every_results_file_carries_the_commit(tmp_path) -> None:
    """The suite stamps a results file that lacks the commit; one that has it is left alone."""
    from benchmarks.common import git_revision, stamp_revision

    rev = git_revision()
    assert rev != "unknown" and rev == git_revision(str(REPO))
    (tmp_path / "a.json").write_text(json.dumps({"figures": {"x": 1}}))
    (tmp_path / "a.md").write_text("# a\n\n| figure | value |\n")
    (tmp_path / "b.md").write_text(f"# b\n\nat {rev}\n")
    assert stamp_revision(str(tmp_path / "a.json"), rev) and stamp_revision(str(tmp_path / "a.md"), rev)
    assert not stamp_revision(str(tmp_path / "b.md"), rev)
    assert not stamp_revision(str(tmp_path / "a.json"), rev)
    assert json.loads((tmp_path / "a.json").read_text())["provenance"]["git_revision"] == rev
    assert rev in (tmp_path / "a.md").read_text().splitlines()[2]


def test_scaling_reads_the_suites_save_restore_results(tmp_path) -> None:
    """Time against size: constant throughput scales 1.0 with r2 1; a fixed cost amortises."""
    from benchmarks import scaling

    for gb in (1, 4, 8):
        for procs in (1, 2):
            med = {
                "reckpt save": 1.0 * gb,  # linear: 1 s per GB
                "reckpt restore (verified)": 0.5 + 0.25 * gb,  # a fixed 0.5 s
                "raw write (2 streams, O_DIRECT)": 0.8 * gb,
                "raw write (1 stream)": 2.0 * gb,
            }
            doc = {"state_bytes": gb * 10**9, "median_seconds": med}
            (tmp_path / f"save_restore_{gb}gb_{procs}p.json").write_text(json.dumps(doc))
    doc = scaling.main(["--results", str(tmp_path)])
    rows = doc["by_procs"]["1p"]["figures"]
    assert rows["reckpt save"]["scaling"] == pytest.approx(1.0)
    assert rows["reckpt save"]["fit"]["s_per_gb"] == pytest.approx(1.0)
    assert rows["reckpt save"]["fit"]["r2"] == pytest.approx(1.0)
    assert rows["reckpt restore (verified)"]["fit"]["fixed_s"] == pytest.approx(0.5)
    assert rows["reckpt restore (verified)"]["scaling"] < 1.0
    assert rows["write ceiling"]["seconds"] == pytest.approx([0.8, 3.2, 6.4])  # the fastest raw write
    assert set(doc["by_procs"]) == {"1p", "2p"}
    flat = doc["per_byte_by_procs"]["8gb"]["reckpt save"]
    assert flat["spread"] == pytest.approx(1.0) and set(flat["seconds_per_gb"]) == {"1p", "2p"}
    assert (tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    assert "scaling.png" in (tmp_path / "scaling.md").read_text()
