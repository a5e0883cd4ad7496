"""Async-save stall versus a synchronous save of the same state, measured in one run.

``python benchmarks/async_stall.py --size-mb 1024`` writes ``benchmarks/results/async_stall.json``,
``.md`` and ``.png``. The stall is how long ``CheckpointManager.save(..., async_save=True)`` blocks the
caller (waiting for nothing in flight + staging a host copy); the synchronous time is a full
``save`` (write, fsync, checksums, commit). Target: stall <= 10% of the synchronous save.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reckpt
from benchmarks.common import Chart, human_bytes, median, provenance, require_free_space, timed, write_results


class BigTables(nn.Module):
    """Embedding tables holding ``size_mb`` MiB of fp32 weights, plus a small dense tower."""

    def __init__(self, size_mb: int, tables: int = 4, dim: int = 64) -> None:
        super().__init__()
        rows = max(1, size_mb * (1 << 20) // (4 * dim * tables))
        self.tables = nn.ModuleList(nn.Embedding(rows, dim) for _ in range(tables))
        self.tower = nn.Sequential(nn.Linear(dim, 256), nn.ReLU(), nn.Linear(256, 1))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="MiB of model state")
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode (the median is reported)")
    parser.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temp dir)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)

    base = args.workdir or tempfile.mkdtemp(prefix="reckpt-bench-")
    os.makedirs(base, exist_ok=True)
    require_free_space(base, 3 * args.size_mb * (1 << 20))
    prov = provenance(base)
    torch.manual_seed(0)
    model = BigTables(args.size_mb)
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    sync_s, stall_s, async_total_s = [], [], []
    first_stall_s = 0.0
    try:
        run = os.path.join(base, "sync")
        mgr = reckpt.CheckpointManager(run)
        for step in range(args.repeats):
            sync_s.append(timed(lambda mgr=mgr, step=step: mgr.save(step, model)))
            shutil.rmtree(os.path.join(run, f"model.ckpt-{step}"))
        mgr.close()

        # Async: the first save allocates the host copy; later saves reuse it (steady state).
        run = os.path.join(base, "async")
        mgr = reckpt.CheckpointManager(run, async_save=True)
        for step in range(args.repeats + 1):
            start = time.perf_counter()
            stall = timed(lambda mgr=mgr, step=step: mgr.save(step, model))
            with torch.no_grad():  # training mutates the weights right away
                model.tower[0].weight.add_(0.0)
            mgr.wait()
            total = time.perf_counter() - start
            shutil.rmtree(os.path.join(run, f"model.ckpt-{step}"))
            if step == 0:
                first_stall_s = stall
            else:
                stall_s.append(stall)
                async_total_s.append(total)
        mgr.close()
    finally:
        if args.workdir is None:
            shutil.rmtree(base, ignore_errors=True)
        else:
            shutil.rmtree(os.path.join(base, "sync"), ignore_errors=True)
            shutil.rmtree(os.path.join(base, "async"), ignore_errors=True)

    figures = {
        "state_bytes": state_bytes,
        "sync_save_s": median(sync_s),
        "async_stall_s": median(stall_s),
        "async_first_stall_s": first_stall_s,
        "async_total_s": median(async_total_s),
        "stall_over_sync": median(stall_s) / median(sync_s),
        "first_stall_over_sync": first_stall_s / median(sync_s),
        "sync_write_gb_per_s": state_bytes / median(sync_s) / 1e9,
    }
    doc = {
        "provenance": prov,
        "target": "stall_over_sync <= 0.10 (steady state: the host copy of the previous save is reused)",
        "meets_target": figures["stall_over_sync"] <= 0.10,
        "figures": figures,
        "runs": {"sync_save_s": sync_s, "async_stall_s": stall_s, "async_total_s": async_total_s},
        "note": "the first async save also allocates the host copy (async_first_stall_s)",
    }
    table = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in figures.items()]
    table.append(("meets target (stall <= 10% of sync)", str(doc["meets_target"])))
    chart = Chart(
        {
            "sync save": figures["sync_save_s"],
            "async stall (steady state)": figures["async_stall_s"],
            "async stall (first save, allocates the host copy)": first_stall_s,
            "async save, stall + background write": figures["async_total_s"],
        },
        "seconds (lower is better)",
        highlight="async stall",
        reference="sync",
        target=0.10 * figures["sync_save_s"],
        target_label="target: stall <= 10% of the sync save",
    )
    title = f"async stall vs sync save of {human_bytes(state_bytes)}"
    json_path, _ = write_results(args.out, "async_stall", doc, table, chart, title)
    print(
        f"state {state_bytes / 1e9:.2f} GB: sync save {figures['sync_save_s']:.2f}s, async stall"
        f" {figures['async_stall_s']:.3f}s ({figures['stall_over_sync']:.1%}); wrote {json_path}"
    )
    return figures


if __name__ == "__main__":
    main()
