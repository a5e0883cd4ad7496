"""The whole benchmark suite in one command: ``python -m benchmarks``.

Runs, in this order, save_restore for nine workloads (1, 4 and 8 GB of state on 1, 2 and 4
processes), async_stall, reshard_load, delta, unsharded_load, dynamic_table and reliability,
each in a fresh Python process (one benchmark's memory or threads do not leak into the
next) calling the benchmark's ``main(argv)``. Each writes ``<name>.json``, ``.md`` and ``.png`` into
``--out``; then the suite writes ``summary.json``, ``summary.md`` and ``summary.png``: one
row per target (the measured ratio, the target, pass or fail), each benchmark's wall time
and status, and the provenance. See :mod:`benchmarks.targets` for the targets. Last,
``scaling.{json,md,png}`` (:mod:`benchmarks.scaling`): time against size for every process
count. Every results file carries the commit it was measured at (``-dirty`` when the tree
differed from it); a benchmark whose files lack it gets it stamped by the suite.

At full size the suite takes several hours on the development VM (2 CPUs): each 8 GB
save_restore run writes about 0.8 TB and reads 0.4 TB (21 writers and 10 readers, 5 rounds).

``--summary-only`` runs nothing: it rebuilds the summary (and the scaling figure) from the
results folder, every run of the plan included. ``--size full`` runs every benchmark at its
documented size; ``--size tiny`` at the tests' tiny sizes (or smaller), one repeat, local storage only, to
check that the suite runs (its figures mean nothing; its results go to ``results/tiny``).
Free disk space is checked first; each benchmark writes into its own folder under
``--workdir``, deleted when it ends. A benchmark that fails is recorded in
the summary and the suite goes on; the exit status is then 1. A missed target does not
change the exit status.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any

from benchmarks import scaling
from benchmarks.common import git_revision, provenance, require_free_space, stamp_revision
from benchmarks.targets import NOT_RUN, STATUSES, evaluate, write_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
MIB = 1 << 20
LOG_TAIL = 40


@dataclass(frozen=True)
class Run:
    """One benchmark run of the suite.

    Attributes:
        name: the run's name (its results are ``<name>.json``, ``.md``, ``.png``).
        module: the module under ``benchmarks`` whose ``main(argv)`` runs it.
        argv: its arguments, without ``--workdir`` and ``--out`` (the suite adds them).
        need_bytes: the free disk space it needs in its work folder.
    """

    name: str
    module: str
    argv: tuple[str, ...]
    need_bytes: int


SAVE_RESTORE_GB = (1, 4, 8)
SAVE_RESTORE_PROCS = (1, 2, 4)


def plan(size: str) -> list[Run]:
    """The suite's runs, in order, for ``size`` (``full`` or ``tiny``)."""
    from benchmarks.save_restore import DISK_FACTOR

    full = size == "full"
    repeats = ("--repeats", "3" if full else "1")
    runs = []
    argv: tuple[str, ...]
    for gb in SAVE_RESTORE_GB:
        for procs in SAVE_RESTORE_PROCS:
            mb = gb * 1024 if full else 8
            name = f"save_restore_{gb}gb_{procs}p"
            # five rounds: the A/B costs are medians of at least five paired rounds
            reps = ("--repeats", "5") if full else ("--repeats", "1", "--pause", "0")
            argv = ("--size-mb", str(mb), "--procs", str(procs), "--name", name, *reps)
            runs.append(Run(name, "save_restore", argv, int(DISK_FACTOR * mb * MIB)))
    mb = 1024 if full else 2
    runs.append(Run("async_stall", "async_stall", ("--size-mb", str(mb), *repeats), 3 * mb * MIB))
    # Embeddings: tables x rows x (dim + row-wise optimizer state) fp32; 3 copies on disk at most.
    rows = 1_000_000 if full else 2000
    argv = repeats if full else ("--rows", str(rows), *repeats)
    runs.append(Run("reshard_load", "reshard_load", argv, 3 * 4 * rows * 65 * 4))
    rows = 1_000_000 if full else 4000
    argv = repeats if full else ("--rows", str(rows), "--dense-mb", "0.05", *repeats)
    runs.append(Run("delta", "delta", argv, 3 * 4 * rows * 65 * 4 + 30 * MIB))
    tables, table_mb = (6, 128) if full else (4, 2)
    argv = () if full else ("--tables", str(tables), "--table-mb", str(table_mb), "--dense-mb", "1")
    runs.append(Run("unsharded_load", "unsharded_load", argv, 2 * tables * table_mb * MIB))
    rows = 50_000_000 if full else 20_000
    argv = (
        ()
        if full
        else (
            "--rows",
            str(rows),
            "--baseline-rows",
            "5000",
            "--candidate-rows",
            "5000",
            "--batch",
            "1000",
            "--repeats",
            "1",
        )
    )
    runs.append(Run("dynamic_table", "dynamic_table", argv, int(2.2 * rows * (20 + 4 * 16)) + 64 * MIB))
    argv = (
        ("--kills", "200", "--seed", "0") if full else ("--kills", "4", "--seed", "0", "--backends", "local")
    )
    runs.append(Run("reliability", "reliability", argv, 256 * MIB))
    # Tiers: the state on the local tier, its copy for the sync baseline, and on the durable one.
    mb = 1024 if full else 8
    argv = ("--size-mb", str(mb), "--procs", "2")
    argv += () if full else ("--repeats", "1", "--kills", "1", "--no-s3")
    runs.append(Run("tiers", "tiers", argv, 4 * mb * MIB))
    return runs


def select(runs: list[Run], only: str | None) -> list[Run]:
    """The runs named in ``only`` (comma-separated run or module names; None: all).

    Raises:
        ValueError: a name matches no run.
    """
    if not only:
        return runs
    names = {n.strip() for n in only.split(",") if n.strip()}
    unknown = names - {r.name for r in runs} - {r.module for r in runs}
    if unknown:
        known = sorted({r.module for r in runs} | {r.name for r in runs})
        raise ValueError(f"unknown benchmark(s) {', '.join(sorted(unknown))}; known: {', '.join(known)}")
    return [r for r in runs if r.name in names or r.module in names]


def child(module: str, result_path: str, argv: list[str]) -> int:
    """In the benchmark's own process: run ``benchmarks.<module>.main(argv)``, save what it returned.

    Writes ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": ..., "traceback": ...}``
    to ``result_path``.

    Returns:
        The process's exit status: 0, or 1 when the benchmark raised (``SystemExit`` included).
    """
    import importlib

    sys.argv = [f"-m benchmarks.{module}", *argv]  # the command the provenance records
    try:
        doc: dict[str, Any] = {
            "ok": True,
            "result": importlib.import_module(f"benchmarks.{module}").main(argv),
        }
    except (Exception, SystemExit) as e:
        doc = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    with open(result_path, "w") as f:
        json.dump(doc, f, default=str)
    return 0 if doc["ok"] else 1


def run_one(
    run: Run, workdir: str, out_dir: str, revision: str | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run one benchmark in a fresh process, streaming its output; delete its work folder after.

    Args:
        run: the run.
        workdir: its work folder (created here, deleted when it ends).
        out_dir: the results folder.
        revision: the commit to stamp into its results files that lack one (default: the
            checkout's, now).

    Returns:
        The run's record for the summary and its target rows.
    """
    os.makedirs(workdir, exist_ok=True)
    argv = [*run.argv, "--workdir", workdir, "--out", out_dir]
    result_path = os.path.join(workdir, ".suite-result.json")
    cmd = [sys.executable, "-m", "benchmarks.suite", "--child", run.module, result_path, "--", *argv]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL)
    started_wall, start = time.time(), time.perf_counter()
    try:
        with subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                tail.append(line.rstrip("\n"))
            rc = proc.wait()
        wall_s = time.perf_counter() - start
        try:
            with open(result_path) as f:
                outcome = json.load(f)
        except (OSError, ValueError):
            outcome = {"ok": False, "error": f"the benchmark's process exited with status {rc}, no result"}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    files = [
        f"{run.name}.{ext}"
        for ext in ("json", "md", "png")
        if os.path.exists(p := os.path.join(out_dir, f"{run.name}.{ext}"))
        and os.path.getmtime(p) >= started_wall
    ]
    revision = revision or git_revision()
    for name in files:
        stamp_revision(os.path.join(out_dir, name), revision)
    error = None if outcome["ok"] else str(outcome["error"])
    record: dict[str, Any] = {
        "name": run.name,
        "module": run.module,
        "command": [os.path.basename(sys.executable), "-m", f"benchmarks.{run.module}", *run.argv],
        "status": "ok" if error is None else "error",
        "wall_s": round(wall_s, 2),
        "error": error,
        "files": files,
    }
    if error is not None:
        record["traceback"] = outcome.get("traceback")
        record["log_tail"] = list(tail)
    docs = [outcome["result"]] if outcome["ok"] and isinstance(outcome.get("result"), dict) else []
    if error is None and f"{run.name}.json" in files:
        with open(os.path.join(out_dir, f"{run.name}.json")) as f:
            docs.append(json.load(f))
    rows = evaluate(run.name, run.module, docs, error)
    for row in rows:
        row["revision"] = revision
    return record, rows


def earlier(run: Run, out_dir: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The record and target rows of a run not run this time: from its results file, if any.

    A run with a results file in ``out_dir`` is evaluated from it (status ``earlier``, the
    file's commit in ``revision``); one without is ``not run`` and so is each of its
    targets, so the summary still lists every target.
    """
    path = os.path.join(out_dir, f"{run.name}.json")
    record: dict[str, Any] = {
        "name": run.name,
        "module": run.module,
        "command": [os.path.basename(sys.executable), "-m", f"benchmarks.{run.module}", *run.argv],
        "wall_s": 0.0,
        "error": None,
    }
    if not os.path.exists(path):
        rows = evaluate(run.name, run.module, [], "not run")
        for row in rows:
            row.update(status=NOT_RUN, revision=None)
        record.update(status=NOT_RUN, files=[], revision=None)
        return record, rows
    with open(path) as f:
        doc = json.load(f)
    revision = (doc.get("provenance") or {}).get("git_revision")
    files = [
        f"{run.name}.{ext}"
        for ext in ("json", "md", "png")
        if os.path.exists(os.path.join(out_dir, f"{run.name}.{ext}"))
    ]
    record.update(status="earlier", files=files, revision=revision)
    rows = evaluate(run.name, run.module, [doc], None)
    for row in rows:
        row["revision"] = revision
    return record, rows


def run_suite(
    size: str,
    runs: list[Run],
    workdir: str | None,
    out_dir: str,
    command: str | None = None,
    every: list[Run] | None = None,
) -> dict[str, Any]:
    """Run ``runs`` in order and write the summary into ``out_dir``.

    Args:
        size: ``full`` or ``tiny`` (recorded in the summary).
        runs: the runs (see :func:`plan`, :func:`select`).
        workdir: where benchmarks write (None: a temporary folder, deleted at the end).
        out_dir: the results folder.
        command: the suite's command line, for the provenance (default: this process's).
        every: the whole plan: the runs of it not in ``runs`` are summarised from their
            results files in ``out_dir`` (:func:`earlier`), so no target goes unlisted
            (default: ``runs`` only).

    Returns:
        The summary: ``size``, ``provenance``, ``wall_s``, ``counts`` (targets per status),
        ``errors`` (names of the failed runs), ``targets`` (rows, see
        :func:`benchmarks.targets.evaluate`, each with the ``revision`` it was measured at)
        and ``benchmarks`` (one record per run of the plan: ``ok`` or ``error`` when run now,
        ``earlier`` or ``not run`` otherwise).

    Raises:
        SystemExit: too little free disk space for the largest run.
    """
    own = workdir is None
    base = tempfile.mkdtemp(prefix="reckpt-suite-") if workdir is None else workdir
    os.makedirs(base, exist_ok=True)
    os.makedirs(out_dir, exist_ok=True)
    start = time.perf_counter()
    records, rows = [], []
    try:
        require_free_space(base, max((r.need_bytes for r in runs), default=0))
        prov = provenance(base)
        if command is not None:
            prov["command"] = command
        for i, run in enumerate(runs, 1):
            print(f"== [{i}/{len(runs)}] {run.name}: {' '.join(run.argv)}", flush=True)
            record, target_rows = run_one(run, os.path.join(base, run.name), out_dir, prov["git_revision"])
            record["revision"] = prov["git_revision"]
            records.append(record)
            rows += target_rows
            print(f"== {run.name}: {record['status']} in {record['wall_s']:.1f} s", flush=True)
    finally:
        if own:
            shutil.rmtree(base, ignore_errors=True)
    ran = {r.name for r in runs}
    for run in every or []:
        if run.name not in ran:
            record, target_rows = earlier(run, out_dir)
            records.append(record)
            rows += target_rows
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    doc = {
        "size": size,
        "provenance": prov,
        "wall_s": round(time.perf_counter() - start, 1),
        "counts": counts,
        "errors": [r["name"] for r in records if r["status"] == "error"],
        "targets": rows,
        "benchmarks": records,
    }
    write_summary(out_dir, doc)
    scaling.write(out_dir, out_dir)  # time against size, when this run measured several sizes
    return doc


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks [--size full|tiny] [--only a,b] [--workdir DIR] [--out DIR]``.

    Returns:
        0, or 1 when a benchmark failed (missed targets do not count).
    """
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--size", choices=("full", "tiny"), default="full", help="full: documented sizes")
    p.add_argument("--only", default=None, help="comma-separated benchmarks or run names (default: all)")
    p.add_argument("--workdir", default=None, help="where benchmarks write (default: a temporary folder)")
    p.add_argument(
        "--out", default=None, help=f"results folder (default: {RESULTS}, and its tiny/ subfolder for tiny)"
    )
    p.add_argument(
        "--summary-only",
        action="store_true",
        help="run nothing: summarise every run of the plan from the results folder",
    )
    args = p.parse_args(argv)
    command = " ".join(["python", "-m", "benchmarks", *(sys.argv[1:] if argv is None else argv)])
    try:
        runs = [] if args.summary_only else select(plan(args.size), args.only)
    except ValueError as e:
        p.error(str(e))
    out_dir = args.out or (RESULTS if args.size == "full" else os.path.join(RESULTS, "tiny"))
    doc = run_suite(args.size, runs, args.workdir, out_dir, command, every=plan(args.size))
    print(f"\nsummary: {os.path.join(out_dir, 'summary.md')}")
    for r in doc["targets"]:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        print(f"  {r['status']:>7}  {r['benchmark']}: {r['figure']} = {ratio} (target {r['target']})")
    for name in doc["errors"]:
        print(f"  FAILED  {name}")
    return 1 if doc["errors"] else 0


if __name__ == "__main__":
    if len(sys.argv) > 4 and sys.argv[1] == "--child" and sys.argv[4] == "--":
        sys.exit(child(sys.argv[2], sys.argv[3], sys.argv[5:]))
    sys.exit(main())
