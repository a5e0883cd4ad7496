"""Async-save stall versus a synchronous save of the same state, measured in one run.

``python benchmarks/async_stall.py --size-mb 1024`` writes ``benchmarks/results/async_stall.json``,
``.md`` and ``.png``. The stall is how long ``CheckpointManager.save(..., async_save=True)`` blocks the
caller; the synchronous time is a full ``save`` (write, fsync, checksums, commit). Both snapshot
modes are measured: ``copy`` (the default: a host copy refilled in place) and ``fork`` (a
copy-on-write image in a child process). Target: stall <= 10% of the synchronous save.

A fork defers a cost instead of paying it at save time: every page the training writes after
the fork faults once, and while the child still writes, the fault also copies the page. Right
after each save the benchmark therefore times two kinds of training writes, and the same
writes while no save runs:

- ``rewrite``: every byte of the state (the worst case; a dense model);
- ``sparse``: 0.1% of each table's rows at random plus the dense tower (an embedding step).
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


@torch.no_grad()
def rewrite(model: nn.Module) -> None:
    """Write every byte of the state in place (the worst case for a copy-on-write snapshot)."""
    for p in model.parameters():
        p.mul_(1.0)


@torch.no_grad()
def sparse_update(model: nn.Module, generator: torch.Generator) -> None:
    """Rewrite 0.1% of each table's rows at random and the whole dense tower (an embedding step)."""
    for table in model.tables:  # type: ignore[union-attr]
        w = table.weight
        rows = torch.randint(0, w.shape[0], (max(1, w.shape[0] // 1000),), generator=generator)
        w.index_copy_(0, rows, w.index_select(0, rows))
    for p in model.tower.parameters():  # type: ignore[union-attr]
        p.mul_(1.0)


def measure(base: str, mode: str, model: nn.Module, repeats: int) -> dict[str, list[float]]:
    """Async saves in ``mode``: stalls, the full rewrite right after each, and stall + background time.

    The first save is left out of the medians (it allocates a copy's buffers or warms up).
    """
    run = os.path.join(base, mode)
    mgr = reckpt.CheckpointManager(run, async_save=True, async_snapshot=mode)
    out: dict[str, list[float]] = {"stall": [], "rewrite": [], "sparse": [], "total": [], "first": []}
    gen = torch.Generator().manual_seed(1)
    for step in range(2 * repeats + 1):
        start = time.perf_counter()
        stall = timed(lambda mgr=mgr, step=step: mgr.save(step, model))
        # Training goes on while the save is written: alternately a sparse step and a full rewrite.
        kind = "sparse" if step % 2 else "rewrite"
        written = timed(lambda k=kind: sparse_update(model, gen) if k == "sparse" else rewrite(model))
        mgr.wait()
        total = time.perf_counter() - start
        shutil.rmtree(os.path.join(run, f"model.ckpt-{step}"))
        if step == 0:
            out["first"].append(stall)
            continue
        out["stall"].append(stall)
        out[kind].append(written)
        out["total"].append(total)
    mgr.close()
    shutil.rmtree(run, ignore_errors=True)
    return out


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
    sync_s: list[float] = []
    idle_rewrite_s = [timed(lambda: rewrite(model)) for _ in range(args.repeats + 1)][1:]
    gen = torch.Generator().manual_seed(1)
    idle_sparse_s = [timed(lambda: sparse_update(model, gen)) for _ in range(args.repeats + 1)][1:]
    try:
        run = os.path.join(base, "sync")
        mgr = reckpt.CheckpointManager(run)
        for step in range(args.repeats):
            sync_s.append(timed(lambda mgr=mgr, step=step: mgr.save(step, model)))
            shutil.rmtree(os.path.join(run, f"model.ckpt-{step}"))
        mgr.close()
        copy = measure(base, "copy", model, args.repeats)
        fork = measure(base, "fork", model, args.repeats)
    finally:
        if args.workdir is None:
            shutil.rmtree(base, ignore_errors=True)
        else:
            for name in ("sync", "fork", "copy"):
                shutil.rmtree(os.path.join(base, name), ignore_errors=True)

    sync = median(sync_s)
    figures = {
        "state_bytes": state_bytes,
        "sync_save_s": sync,
        "async_stall_s": median(copy["stall"]),
        "stall_over_sync": median(copy["stall"]) / sync,
        "async_first_stall_s": copy["first"][0],
        "async_total_s": median(copy["total"]),
        "fork_stall_s": median(fork["stall"]),
        "fork_stall_over_sync": median(fork["stall"]) / sync,
        "fork_first_stall_s": fork["first"][0],
        "fork_total_s": median(fork["total"]),
        "rewrite_idle_s": median(idle_rewrite_s),
        "rewrite_during_copy_save_s": median(copy["rewrite"]),
        "rewrite_during_fork_save_s": median(fork["rewrite"]),
        "sparse_idle_s": median(idle_sparse_s),
        "sparse_during_copy_save_s": median(copy["sparse"]),
        "sparse_during_fork_save_s": median(fork["sparse"]),
        "sync_write_gb_per_s": state_bytes / sync / 1e9,
    }
    doc = {
        "provenance": prov,
        "target": "stall_over_sync <= 0.10 (default snapshot: copy); fork_stall_over_sync <= 0.10",
        "meets_target": figures["stall_over_sync"] <= 0.10,
        "figures": figures,
        "runs": {
            "sync_save_s": sync_s,
            "fork": fork,
            "copy": copy,
            "rewrite_idle_s": idle_rewrite_s,
            "sparse_idle_s": idle_sparse_s,
        },
        "note": (
            "first stalls allocate the copy's buffers (copy) or warm up (fork); rewrite_* writes every"
            " byte of the state right after the save returns (the worst case of the fork's deferred page"
            " faults), sparse_* 0.1% of each table's rows plus the tower; *_idle_s: the same while no"
            " save runs"
        ),
    }
    table = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in figures.items()]
    table.append(("meets target (default stall <= 10% of sync)", str(doc["meets_target"])))
    chart = Chart(
        {
            "sync save": sync,
            "async stall, copy (default)": figures["async_stall_s"],
            "async stall, fork": figures["fork_stall_s"],
            "full rewrite, no save running": figures["rewrite_idle_s"],
            "full rewrite during a copy save": figures["rewrite_during_copy_save_s"],
            "full rewrite during a fork save": figures["rewrite_during_fork_save_s"],
            "sparse step, no save running": figures["sparse_idle_s"],
            "sparse step during a copy save": figures["sparse_during_copy_save_s"],
            "sparse step during a fork save": figures["sparse_during_fork_save_s"],
        },
        "seconds (lower is better)",
        highlight="async stall",
        reference="sync",
        target=0.10 * sync,
        target_label="target: stall <= 10% of the sync save",
    )
    title = f"async stall vs sync save of {human_bytes(state_bytes)}"
    json_path, _ = write_results(args.out, "async_stall", doc, table, chart, title)
    print(
        f"state {state_bytes / 1e9:.2f} GB: sync save {sync:.2f}s, async stall copy"
        f" {figures['async_stall_s']:.3f}s ({figures['stall_over_sync']:.1%}), fork"
        f" {figures['fork_stall_s']:.3f}s ({figures['fork_stall_over_sync']:.1%}); wrote {json_path}"
    )
    return figures


if __name__ == "__main__":
    main()
