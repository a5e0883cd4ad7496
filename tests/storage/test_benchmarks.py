"""The benchmarks run at a tiny size in CI so they cannot rot (no timing is asserted)."""

from __future__ import annotations

import json

from benchmarks import async_stall


def test_async_stall_benchmark_tiny(tmp_path) -> None:
    figures = async_stall.main(["--size-mb", "2", "--repeats", "1", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "async_stall.json").read_text())
    assert doc["figures"] == figures
    assert {"command", "git_revision", "host"} <= doc["provenance"].keys()
    assert figures["sync_save_s"] > 0 and figures["async_stall_s"] > 0
    assert (tmp_path / "async_stall.md").read_text().startswith("# async_stall")


def test_save_restore_benchmark_tiny(tmp_path) -> None:
    from benchmarks import save_restore

    doc = save_restore.main(["--size-mb", "2", "--repeats", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "save_restore.json").read_text())
    assert saved["ratios"] == doc["ratios"] and saved["state_bytes"] > 0
    assert {
        "raw write",
        "raw read",
        "torch.save",
        "DCP load",
        "reckpt save",
        "reckpt restore (verified)",
    } <= set(saved["median_seconds"])
    assert (tmp_path / "save_restore.png").read_bytes()[:4] == b"\x89PNG"


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


def test_reshard_load_benchmark_tiny(tmp_path) -> None:
    from benchmarks import reshard_load

    doc = reshard_load.main(
        ["--rows", "2000", "--repeats", "1", "--out", str(tmp_path), "--workdir", str(tmp_path)]
    )
    saved = json.loads((tmp_path / "reshard_load.json").read_text())
    assert saved["ratios"] == doc["ratios"]
    assert {"restore 2 -> 2", "restore 1 -> 1", "restore 2 -> 1"} <= set(saved["median_seconds"])
