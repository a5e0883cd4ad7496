"""Async-save stall versus a synchronous save of the same state, and what the training pays after.

``python -m benchmarks.async_stall --size-mb 1024`` writes ``benchmarks/results/async_stall.json``,
``.md`` and ``.png``. The stall is how long ``CheckpointManager.save(..., async_save=True)`` blocks
the caller; the synchronous time is a full ``save`` (write, fsync, checksums, commit). Both
snapshot modes are measured: ``copy`` (the default: a host copy refilled in place) and ``fork``
(a copy-on-write image in a child process). Target: the default mode's stall <= 5% of a sync save.

A stall alone can hide a cost the training pays later: while a save is written the training
shares the CPUs and memory bandwidth with the writer, and after a fork every page it writes
faults once (and is copied while the child lives). So after each async save the benchmark runs
``--steps`` training steps and times each, counts the training thread's minor page faults
(``RUSAGE_THREAD``), and compares them with the same steps while no save is in flight. Two
kinds of steps, each in its own rounds:

- ``sparse``: an embedding step: look up ``--batch`` random rows per table, forward and backward
  through the dense tower, update the tower and the looked-up rows in place;
- ``rewrite``: write every byte of the state (a dense model; the worst case for a fork).

A round measures a sync save, an async save in each mode and idle steps, in an order that
rotates from round to round (the disk's speed drifts); figures are medians over the rounds.
Each mode runs in a process of its own, with its own copy of the model: a fork marks every
page of its process copy-on-write, and whatever that process measured next would pay for it.
Idle steps run in the sync process, which never forks.
Memory: the extra resident memory of each mode over the model's own (the copy keeps a host
copy of the state; a fork's child holds every page the training rewrote while it lived).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reckpt
from benchmarks.common import (
    Chart,
    children_private_bytes,
    human_bytes,
    median,
    provenance,
    require_free_space,
    timed,
    write_results,
)

MODES = ("copy", "fork")
WORKLOADS = ("sparse", "rewrite")
TARGET = 0.05
LR = 1e-3


class BigTables(nn.Module):
    """Embedding tables holding ``size_mb`` MiB of fp32 weights, plus a small dense tower."""

    def __init__(self, size_mb: int, tables: int = 4, dim: int = 64) -> None:
        super().__init__()
        rows = max(1, size_mb * (1 << 20) // (4 * dim * tables))
        self.tables = nn.ModuleList(nn.Embedding(rows, dim) for _ in range(tables))
        self.tower = nn.Sequential(nn.Linear(dim, 256), nn.ReLU(), nn.Linear(256, 1))


class Trainer:
    """The training steps run after each save: ``sparse`` (an embedding step) or ``rewrite``."""

    def __init__(self, model: BigTables, batch: int) -> None:
        self.model = model
        self.batch = batch
        self.gen = torch.Generator().manual_seed(1)

    def sparse(self) -> None:
        """Look up ``batch`` rows per table, train the tower on their sum, update the rows in place."""
        tables = [t.weight for t in self.model.tables]  # type: ignore[union-attr]
        ids = [torch.randint(0, w.shape[0], (self.batch,), generator=self.gen) for w in tables]
        with torch.no_grad():
            x = torch.stack([w.index_select(0, i) for w, i in zip(tables, ids, strict=True)]).sum(0)
        x.requires_grad_(True)
        self.model.tower(x).square().mean().backward()
        with torch.no_grad():
            for p in self.model.tower.parameters():
                p.sub_(p.grad, alpha=LR)  # type: ignore[arg-type]
                p.grad = None
            grad = x.grad.mul(-LR)  # type: ignore[union-attr]
            for w, i in zip(tables, ids, strict=True):  # a repeated row keeps one update
                w.index_copy_(0, i, w.index_select(0, i).add_(grad))

    @torch.no_grad()
    def rewrite(self) -> None:
        """Write every byte of the state in place."""
        for p in self.model.parameters():
            p.mul_(1.0)


def _minflt() -> int:
    """Minor page faults of the calling thread so far."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


def _status_kb(field: str, pid: str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    """Reset the process's peak resident size (``VmHWM``) to its current size."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_steps(step: Callable[[], None], count: int, sample: bool = False) -> dict[str, float]:
    """``count`` steps: their total seconds, the training thread's minor faults and, with
    ``sample``, the most memory the process's children held alone after any step."""
    faults = seconds = 0.0
    child = 0
    for _ in range(count):
        before = _minflt()
        seconds += timed(step)
        faults += _minflt() - before
        if sample:
            child = max(child, children_private_bytes())
    return {"steps_s": seconds, "minflt": faults, "child_private": float(child)}


def measure_async(
    mgr: reckpt.CheckpointManager,
    run: str,
    step_no: int,
    model: nn.Module,
    step: Callable[[], None],
    count: int,
) -> dict[str, float]:
    """One async save followed by ``count`` training steps, then a wait for the commit."""
    rss = _status_kb("VmRSS") << 10
    _reset_peak()
    start = time.perf_counter()
    mgr.save(step_no, model)
    stall = time.perf_counter() - start
    out = run_steps(step, count, sample=True)
    mgr.wait()
    out.update(
        stall=stall, total_s=time.perf_counter() - start, extra_rss=float((_status_kb("VmHWM") << 10) - rss)
    )
    shutil.rmtree(os.path.join(run, f"model.ckpt-{step_no}"))
    return out


class _Worker:
    """A process holding its own copy of the model (same seed) and one manager, measuring on request.

    Each mode runs in a process of its own: a fork marks every page of the process
    copy-on-write, so copy saves or idle steps measured after a fork save in the same
    process would pay the fork's faults. ``sync`` also runs the idle steps (it never forks).
    """

    def __init__(self, ctx: Any, kind: str, args: argparse.Namespace, base: str) -> None:
        self.conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(theirs, kind, vars(args), base), name=f"bench-{kind}")
        self.proc.start()
        theirs.close()

    def ask(self, *request: Any) -> dict[str, float]:
        self.conn.send(request)
        status, got = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"{self.proc.name} failed:\n{got}")
        return cast(dict[str, float], got)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.proc.join(120)
        if self.proc.is_alive():
            self.proc.kill()


def _serve(conn: Any, kind: str, a: dict[str, Any], base: str) -> None:
    """A worker's loop: ``("sync" | "idle" | "async" | "first" | "warm", workload, save number)``."""
    torch.manual_seed(0)
    rss0 = _status_kb("VmRSS") << 10
    model = BigTables(a["size_mb"])
    trainer = Trainer(model, a["batch"])
    steps = {"sparse": (trainer.sparse, a["steps"]), "rewrite": (trainer.rewrite, a["rewrite_steps"])}
    run = os.path.join(base, kind)
    async_kw: dict[str, Any] = {} if kind == "sync" else {"async_save": True, "async_snapshot": kind}
    mgr = reckpt.CheckpointManager(run, **async_kw)
    try:
        while (request := conn.recv()) is not None:
            what, workload, save_no = request
            step, count = steps[workload]
            try:
                if what == "sync":
                    out = {"save_s": timed(lambda n=save_no: mgr.save(n, model))}
                    shutil.rmtree(os.path.join(run, f"model.ckpt-{save_no}"))
                elif what == "idle":
                    out = run_steps(step, count)
                elif what == "warm":
                    for warm, _ in steps.values():
                        warm()
                    if kind == "sync":  # as the async modes' first saves, left out
                        mgr.save(save_no, model)
                        shutil.rmtree(os.path.join(run, f"model.ckpt-{save_no}"))
                    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
                    out = {
                        "state_bytes": float(state),
                        "model_rss": float((_status_kb("VmRSS") << 10) - rss0),
                    }
                else:
                    before = _status_kb("VmRSS") << 10
                    out = measure_async(mgr, run, save_no, model, step, count)
                    out["kept_rss"] = float((_status_kb("VmRSS") << 10) - before)
                conn.send(("ok", out))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    finally:
        mgr.close()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="MiB of model state")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per workload")
    parser.add_argument("--steps", type=int, default=20, help="sparse training steps timed after a save")
    parser.add_argument("--rewrite-steps", type=int, default=3, help="full rewrites timed after a save")
    parser.add_argument("--batch", type=int, default=1024, help="rows looked up per table and sparse step")
    parser.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temp dir)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)

    base = args.workdir or tempfile.mkdtemp(prefix="reckpt-bench-")
    os.makedirs(base, exist_ok=True)
    require_free_space(base, 3 * args.size_mb * (1 << 20))
    prov = provenance(base)
    counts = {"sparse": args.steps, "rewrite": args.rewrite_steps}
    runs: dict[str, Any] = {"sync_save_s": [], "order": []}
    runs.update({k: {w: [] for w in WORKLOADS} for k in (*MODES, "idle")})
    for mode in MODES:
        runs[mode].update(
            stall=[], total_s=[], minflt={w: [] for w in WORKLOADS}, extra_rss=[], child_private=[]
        )
    runs["idle"]["minflt"] = {w: [] for w in WORKLOADS}
    ctx = multiprocessing.get_context("spawn")
    workers = {kind: _Worker(ctx, kind, args, base) for kind in ("sync", *MODES)}
    first: dict[str, dict[str, float]] = {}
    try:
        warm = {kind: w.ask("warm", "sparse", 0) for kind, w in workers.items()}
        for mode in MODES:  # the first save of each mode allocates the host copy or warms up
            first[mode] = workers[mode].ask("first", "sparse", 0)
        kinds = ("sync", *MODES, "idle")
        for rnd in range(args.repeats):
            for w_i, workload in enumerate(WORKLOADS):
                shift = (rnd + w_i) % len(kinds)
                order = kinds[shift:] + kinds[:shift]
                runs["order"].append(f"{workload}: {', '.join(order)}")
                save_no = 1 + rnd * len(WORKLOADS) + w_i
                for kind in order:
                    got = workers["sync" if kind == "idle" else kind].ask(
                        "async" if kind in MODES else kind, workload, save_no
                    )
                    if kind == "sync":
                        runs["sync_save_s"].append(got["save_s"])
                    elif kind == "idle":
                        runs["idle"][workload].append(got["steps_s"])
                        runs["idle"]["minflt"][workload].append(got["minflt"])
                    else:
                        runs[kind][workload].append(got["steps_s"])
                        runs[kind]["minflt"][workload].append(got["minflt"])
                        for key in ("stall", "total_s", "extra_rss", "child_private"):
                            runs[kind][key].append(got[key])
    finally:
        for w in workers.values():
            w.stop()
        if args.workdir is None:
            shutil.rmtree(base, ignore_errors=True)
        else:
            for name in ("sync", *MODES):
                shutil.rmtree(os.path.join(base, name), ignore_errors=True)

    state_bytes = int(warm["sync"]["state_bytes"])
    figures = summarize(runs, first, state_bytes, counts, warm["sync"]["model_rss"])
    doc = {
        "provenance": prov,
        "target": f"stall_over_sync <= {TARGET} (default snapshot: copy); fork_stall_over_sync <= 0.10",
        "meets_target": figures["stall_over_sync"] <= TARGET,
        "figures": figures,
        "runs": runs,
        "first_save": first,
        "settings": {
            "rounds": args.repeats,
            "sparse_steps": args.steps,
            "rewrite_steps": args.rewrite_steps,
            "batch_rows_per_table": args.batch,
        },
        "note": (
            "*_over_sync: median over rounds of stall / the same round's sync save. *_step_*_s: one"
            " training step, mean over the steps after a save (or with no save: idle), median over"
            " rounds; *_extra_s: what those steps took beyond idle ones, per save; *_minflt: the"
            " training thread's minor page faults per step. *_rss_over_state: extra resident memory"
            " of the mode over the state's bytes (copy: the host copy kept between saves; fork: the"
            " parent's peak growth during a save plus what the child held alone)"
        ),
    }
    table = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in figures.items()]
    table.append((f"meets target (default stall <= {TARGET:.0%} of sync)", str(doc["meets_target"])))
    sync = figures["sync_save_s"]
    charts = [
        Chart(
            {
                "sync save": sync,
                "async stall, copy (default)": figures["async_stall_s"],
                "async stall, fork": figures["fork_stall_s"],
                f"stall + slowdown of {args.steps} sparse steps, copy": figures["async_stall_s"]
                + figures["sparse_copy_extra_s"],
                f"stall + slowdown of {args.steps} sparse steps, fork": figures["fork_stall_s"]
                + figures["sparse_fork_extra_s"],
            },
            "seconds per save (lower is better)",
            highlight="async stall",
            reference="sync",
            target=TARGET * sync,
            target_label=f"target: stall <= {TARGET:.0%} of the sync save",
        ),
        Chart(
            {f"{w} step, {k}": figures[f"{w}_step_{k}_s"] for w in WORKLOADS for k in ("idle", *MODES)},
            "seconds per training step after a save (lower is better)",
            highlight=("sparse step, copy", "rewrite step, copy"),
            reference=("sparse step, idle", "rewrite step, idle"),
        ),
    ]
    title = f"async stall vs sync save of {human_bytes(state_bytes)}"
    json_path, _ = write_results(args.out, "async_stall", doc, table, charts, title)
    print(
        f"state {state_bytes / 1e9:.2f} GB: sync save {sync:.2f}s, async stall copy"
        f" {figures['async_stall_s']:.3f}s ({figures['stall_over_sync']:.1%}), fork"
        f" {figures['fork_stall_s']:.3f}s ({figures['fork_stall_over_sync']:.1%}); wrote {json_path}"
    )
    return figures


def summarize(
    runs: dict[str, Any],
    first: dict[str, dict[str, float]],
    state_bytes: int,
    counts: dict[str, int],
    rss_model: float,
) -> dict[str, float]:
    """The medians and ratios of ``runs`` (see ``main``'s note for what each figure means)."""
    sync_s = runs["sync_save_s"]
    figures: dict[str, float] = {"state_bytes": state_bytes, "sync_save_s": median(sync_s)}
    names = {
        "copy": ("async_stall_s", "stall_over_sync", "async"),
        "fork": ("fork_stall_s", "fork_stall_over_sync", "fork"),
    }
    for mode, (stall_key, ratio_key, prefix) in names.items():
        stalls = runs[mode]["stall"]
        figures[stall_key] = median(stalls)
        figures[ratio_key] = median([s / y for s, y in zip(stalls, sync_s, strict=True)])
        figures[f"{prefix}_first_stall_s"] = first[mode]["stall"]
        figures[f"{prefix}_total_s"] = median(runs[mode]["total_s"])
    for workload, count in counts.items():
        idle = [s / count for s in runs["idle"][workload]]
        figures[f"{workload}_step_idle_s"] = median(idle)
        figures[f"{workload}_minflt_idle"] = median([f / count for f in runs["idle"]["minflt"][workload]])
        for mode in MODES:
            during = [s / count for s in runs[mode][workload]]
            figures[f"{workload}_step_{mode}_s"] = median(during)
            figures[f"{workload}_slowdown_{mode}"] = median(during) / max(median(idle), 1e-12)
            extra = [(d - i) * count for d, i in zip(during, idle, strict=True)]
            figures[f"{workload}_{mode}_extra_s"] = median(extra)
            figures[f"{workload}_minflt_{mode}"] = median([f / count for f in runs[mode]["minflt"][workload]])
    figures["copy_rss_over_state"] = (
        first["copy"]["kept_rss"] + max(runs["copy"]["extra_rss"])
    ) / state_bytes
    figures["fork_rss_over_state"] = (
        max(runs["fork"]["extra_rss"]) + max(runs["fork"]["child_private"])
    ) / state_bytes
    figures["model_rss_over_state"] = rss_model / state_bytes
    figures["sync_write_gb_per_s"] = state_bytes / figures["sync_save_s"] / 1e9
    return figures


if __name__ == "__main__":
    main()
