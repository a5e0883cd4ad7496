"""Checkpoint tiers: what the training pays, how fast a restart is, how much a failure costs.

``python -m benchmarks.tiers --size-mb 1024 --procs 2`` writes ``benchmarks/results/tiers.json``,
``.md`` and ``.png``. The state is ``--size-mb`` MiB of embedding rows split over ``--procs``
gloo processes (each rank its own table); the tiers are shared memory (``/dev/shm``), a local
disk folder (``--workdir``) and S3 (moto's server on 127.0.0.1; a local folder with ``--no-s3``).
Figures (medians over ``--repeats``):

- **blocking**: how long ``CheckpointManager.save`` blocks the caller for a memory-tier save
  (asynchronous, host copy; and ``async_snapshot="fork"``) against a synchronous save of the
  same state to the local disk. Target: memory-tier blocking <= 5% of the disk save.
- **restart to first step**: from ``restore_latest`` to the end of the first training step in
  fresh processes, when the newest step is in memory, only on a cold local disk (page cache
  dropped), only on S3. Target: memory >= 5x faster than the cold local disk.
- **time to durable**: from the save of a step due on every tier to its commit on S3 (the
  persister copies memory -> disk -> S3 meanwhile).
- **steps lost per failure**: training with memory every ``--mem-every`` and disk every
  ``--local-every`` steps, both processes SIGKILLed at a random step ``--kills`` times; lost =
  the steps trained to their end after the step resumed. Target: <= 50 (memory every 50).
- **throughput**: training steps per second with the tiers on against checkpointing off, over
  ``--train-steps`` steps of ``--step-ms`` milliseconds of compute each. Target: >= 97%.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from benchmarks.common import Chart, drop_cache, median, provenance, require_free_space, write_results

NAME = "tiers"
TARGETS = {"blocking": 0.05, "restart": 5.0, "lost": 50, "throughput": 0.97}
PROFILE = ("direct_verified_s", "direct_unverified_s", "raw_read_s")
"""The restart-from-memory profile: the same checkpoint restored directly, and read raw."""


class Tables(nn.Module):
    """One embedding table per rank (its shard of the state) and a small dense layer to compute with."""

    def __init__(self, rank: int, rows: int, dim: int) -> None:
        super().__init__()
        self.tables = nn.ParameterDict(
            {f"r{rank}": nn.Parameter(torch.zeros(rows, dim), requires_grad=False)}
        )
        self.dense = nn.Parameter(torch.ones(256, 256) / 256, requires_grad=False)


def _train_step(model: Tables, rank: int, step: int, step_ms: float) -> None:
    """Update 1024 rows (a sparse step), then compute for ``step_ms`` (the rest of a training step)."""
    table = next(iter(model.tables.values()))
    g = torch.Generator().manual_seed(step * 7919 + rank)
    rows = torch.randint(0, table.shape[0], (1024,), generator=g)
    table.index_add_(0, rows, torch.full((1024, table.shape[1]), 1e-3))
    end = time.perf_counter() + step_ms / 1000
    x = torch.ones(64, 256)
    while time.perf_counter() < end:
        x = torch.tanh(x @ model.dense)


def _tiers(cfg: dict[str, Any]) -> list[Any]:
    from reckpt.tiers.config import Tier

    return [
        Tier("memory", cfg["mem"], cfg["mem_every"], keep=1),
        Tier("local", cfg["local"], cfg["local_every"], keep=2),
        Tier("durable", cfg["durable"], cfg["durable_every"], keep=2, shared=True),
    ]


def _manager(cfg: dict[str, Any], **kw: Any) -> Any:
    import reckpt

    return reckpt.CheckpointManager(cfg["durable"], tiers=_tiers(cfg), async_save=True, **kw)


def _job_blocking(rank: int, cfg: dict[str, Any], model: Tables) -> dict[str, Any]:
    import reckpt

    out: dict[str, Any] = {"sync_s": [], "memory_copy_s": [], "memory_fork_s": []}
    sync = reckpt.CheckpointManager(cfg["sync"], keep_checkpoint_max=1)
    tiered = _manager(cfg)
    forked = _manager(_fork_cfg(cfg), async_snapshot="fork")
    step = cfg["mem_every"]
    for i in range(cfg["repeats"] + 1):  # the first round warms the host copy up
        for name, mgr, kw in (
            ("sync_s", sync, {}),
            ("memory_copy_s", tiered, {}),
            ("memory_fork_s", forked, {}),
        ):
            _train_step(model, rank, step, 0)
            mgr.wait()
            dist.barrier()
            start = time.perf_counter()
            mgr.save(step, model, **kw)
            blocked = time.perf_counter() - start
            if i:
                out[name].append(blocked)
            step += cfg["mem_every"]
        tiered.wait()
        forked.wait()
    for mgr in (sync, tiered, forked):
        mgr.close()
    return out


def _fork_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    """The tiers of the fork-snapshot manager: a run of its own (own model_dir, own folders)."""
    return {**cfg, **{k: cfg[k] + "-fork" for k in ("mem", "local", "durable")}}


def _job_prepare(rank: int, cfg: dict[str, Any], model: Tables) -> dict[str, Any]:
    """One checkpoint on every tier (the final save of a run goes everywhere)."""
    _train_step(model, rank, 1, 0)
    with _manager(cfg) as mgr:
        mgr.maybe_save(cfg["mem_every"], model, final=True)
    return {}


def _job_restart(rank: int, cfg: dict[str, Any], model: Tables) -> dict[str, Any]:
    """``restore_latest`` and one step, timed from the call (the manager, and with it the S3
    client, exists already: every restart pays that alike)."""
    with _manager(cfg) as mgr:
        mgr.latest_checkpoint()  # the storages' clients connect (not what differs between tiers)
        dist.barrier()
        start = time.perf_counter()
        info = mgr.restore_latest(model)
        assert info is not None, "nothing to resume"
        restored = time.perf_counter() - start
        _train_step(model, rank, info.step + 1, cfg["step_ms"])
        seconds = time.perf_counter() - start
        out = {"seconds": seconds, "restore_s": restored, "tier": info.tier, "step": info.step}
        if cfg.get("profile") and info.tier == "memory":
            out.update(_restart_profile(info.path, model))
        return out


def _restart_profile(path: str, model: Tables) -> dict[str, float]:
    """Where a restart from memory spends its time: the same checkpoint restored directly
    (verified, the default; and ``verify=False``) and its files read raw, after the timed run."""
    import reckpt

    files = [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
    out = {}
    for name, call in (
        ("direct_verified_s", lambda: reckpt.restore_model(path, model)),
        ("direct_unverified_s", lambda: reckpt.restore_model(path, model, verify=False)),
        ("raw_read_s", lambda: [Path(f).read_bytes() for f in files]),
    ):
        dist.barrier()
        start = time.perf_counter()
        call()
        out[name] = time.perf_counter() - start
    return out


def _job_durable(rank: int, cfg: dict[str, Any], model: Tables) -> dict[str, Any]:
    from reckpt.commit.state import checkpoint_state
    from reckpt.storage.core import storage_for

    times = []
    durable = _tiers(cfg)[2]
    storage = storage_for(durable.url)
    with _manager(cfg) as mgr:
        for i in range(1, cfg["repeats"] + 1):
            step = i * cfg["durable_every"]
            _train_step(model, rank, step, 0)
            start = time.perf_counter()
            mgr.save(step, model)
            if rank == 0:
                while checkpoint_state(storage, durable.checkpoint_dir(step)) != "committed":
                    time.sleep(0.01)
                times.append(time.perf_counter() - start)
            dist.barrier()
    return {"seconds": times}


def _job_train(rank: int, cfg: dict[str, Any], model: Tables) -> dict[str, Any]:
    """Train from the newest checkpoint (or 1) to ``train_steps``; report progress as it goes."""
    mgr = _manager(cfg) if cfg["tiers_on"] else None
    first = 1
    if mgr is not None:
        info = mgr.restore_latest(model)
        first = 1 if info is None else info.step + 1
    progress = os.path.join(cfg["out"], f"progress-rank{rank}")
    start = time.perf_counter()
    for step in range(first, cfg["train_steps"] + 1):
        with open(progress, "w") as f:
            f.write(str(step))
        _train_step(model, rank, step, cfg["step_ms"])
        if mgr is not None:
            mgr.maybe_save(step, model)
    elapsed = time.perf_counter() - start
    if mgr is not None:
        mgr.close()
    return {"first": first, "steps": cfg["train_steps"] - first + 1, "seconds": elapsed}


JOBS = {"blocking": _job_blocking, "prepare": _job_prepare, "restart": _job_restart}
JOBS.update({"durable": _job_durable, "train": _job_train})


def _entry(rank: int, world: int, init: str, job: str, cfg: dict[str, Any]) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    model = Tables(rank, cfg["rows"], cfg["dim"])
    result = JOBS[job](rank, cfg, model)
    with open(os.path.join(cfg["out"], f"{job}-rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def run_world(job: str, cfg: dict[str, Any], world: int, kill_at: int | None = None) -> list[dict[str, Any]]:
    """Run ``job`` on ``world`` spawned gloo processes; with ``kill_at``, SIGKILL them all at that step.

    Returns each rank's result (nothing when killed).
    """
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(
            _entry, args=(world, f"{tmp}/rdzv", job, cfg), nprocs=world, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + 1800
        while not ctx.join(timeout=0.005 if kill_at is not None else 1.0):
            if kill_at is not None and _progress(cfg) >= kill_at:
                for p in ctx.processes:
                    os.kill(p.pid, signal.SIGKILL)
                for p in ctx.processes:
                    p.join()
                return []
            if time.monotonic() > deadline:
                raise TimeoutError(f"{job} did not finish")
    return [json.load(open(os.path.join(cfg["out"], f"{job}-rank{r}.json"))) for r in range(world)]


def _progress(cfg: dict[str, Any]) -> int:
    try:
        with open(os.path.join(cfg["out"], "progress-rank0")) as f:
            return int(f.read() or 0)
    except (OSError, ValueError):
        return 0


def _wait_persister(cfg: dict[str, Any]) -> None:
    from reckpt.tiers.config import TierSet
    from reckpt.tiers.control import Control

    control = Control(TierSet(_tiers(cfg)).control_dir)
    while control.persister_running():
        time.sleep(0.05)


def _fresh(cfg: dict[str, Any]) -> None:
    """Empty every tier (and wait for the persister to be gone first); forget the last progress."""
    from reckpt.storage.core import storage_for

    for name in os.listdir(cfg["out"]):
        if name.startswith("progress-"):
            os.remove(os.path.join(cfg["out"], name))

    for run in (cfg, _fork_cfg(cfg)):
        _wait_persister(run)
        for path in (run["mem"], run["local"], run["sync"]):
            shutil.rmtree(path, ignore_errors=True)
        storage_for(run["durable"]).rm(run["durable"], recursive=True)


def _drop_copies(cfg: dict[str, Any], *urls: str) -> None:
    for url in urls:
        for name in os.listdir(url):
            if name.startswith("model.ckpt-"):
                shutil.rmtree(os.path.join(url, name))


def _start_s3(args: argparse.Namespace) -> tuple[str, Any]:
    if args.no_s3:
        return "", None
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1").create_bucket(
        Bucket="bench"
    )
    return "s3://bench/run", server


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="MiB of state, over all processes")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--mem-every", type=int, default=50)
    parser.add_argument("--local-every", type=int, default=500)
    parser.add_argument("--durable-every", type=int, default=2000)
    parser.add_argument("--train-steps", type=int, default=600)
    parser.add_argument("--step-ms", type=float, default=100.0, help="compute per training step")
    parser.add_argument("--workdir", default=None, help="the local-disk tier's folder (default: a temp dir)")
    parser.add_argument("--shm", default="/dev/shm", help="where the memory tier lives")
    parser.add_argument("--no-s3", action="store_true", help="durable tier: a local folder, not moto's S3")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--name", default=NAME)
    args = parser.parse_args(argv)

    base = args.workdir or tempfile.mkdtemp(prefix="reckpt-bench-tiers-")
    os.makedirs(base, exist_ok=True)
    require_free_space(base, 4 * args.size_mb << 20)
    shm = tempfile.mkdtemp(prefix="reckpt-bench-tiers-", dir=args.shm)
    scratch = tempfile.mkdtemp(prefix="reckpt-bench-tiers-out-")
    prov = provenance(base)
    durable, server = _start_s3(args)
    dim = 64
    rows = max(1, (args.size_mb << 20) // (args.procs * dim * 4))
    cfg: dict[str, Any] = {
        "mem": f"{shm}/mem",
        "local": f"{base}/local",
        "durable": durable or f"{base}/durable",
        "sync": f"{base}/sync",
        "mem_every": args.mem_every,
        "local_every": args.local_every,
        "durable_every": args.durable_every,
        "rows": rows,
        "dim": dim,
        "repeats": args.repeats,
        "step_ms": args.step_ms,
        "train_steps": args.train_steps,
        "tiers_on": True,
        "out": scratch,
    }
    world = args.procs
    runs: dict[str, Any] = {}
    try:
        _fresh(cfg)
        got = run_world("blocking", cfg, world)
        runs["blocking"] = {k: [max(r[k][i] for r in got) for i in range(args.repeats)] for k in got[0]}
        restart: dict[str, list[float]] = {"memory": [], "local": [], "durable": []}
        tiers_read: dict[str, list[str]] = {k: [] for k in restart}
        profile: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            for where in restart:
                _fresh(cfg)
                run_world("prepare", cfg, world)
                _wait_persister(cfg)
                if where != "memory":
                    _drop_copies(cfg, cfg["mem"])
                if where == "durable":
                    _drop_copies(cfg, cfg["local"])
                drop_cache(cfg["local"])
                got = run_world("restart", {**cfg, "profile": True}, world)
                restart[where].append(max(r["seconds"] for r in got))
                tiers_read[where].append(got[0]["tier"])
                if where == "memory":
                    for key in ("restore_s", *PROFILE):
                        profile.setdefault(key, []).append(max(r[key] for r in got))
        runs["restart"], runs["restart_tier"] = restart, tiers_read
        runs["restart_profile"] = profile
        _fresh(cfg)
        got = run_world("durable", {**cfg, "durable_every": args.mem_every}, world)
        runs["to_durable_s"] = got[0]["seconds"]
        lost = []
        rng = random.Random(0)
        for _ in range(args.kills):
            _fresh(cfg)
            kill_at = rng.randint(args.mem_every + 1, args.train_steps - 1)
            run_world("train", cfg, world, kill_at=kill_at)
            reached = _progress(cfg)
            got = run_world("train", {**cfg, "train_steps": reached}, world)
            lost.append(reached - got[0]["first"])  # steps trained to the end since the step resumed
        runs["steps_lost"] = lost
        speed = {}
        for on in (False, True):
            _fresh(cfg)
            got = run_world("train", {**cfg, "tiers_on": on}, world)
            speed[on] = min(r["steps"] / r["seconds"] for r in got)
        runs["steps_per_s"] = {"off": speed[False], "on": speed[True]}
    finally:
        _fresh(cfg)
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
        if args.workdir is None:
            shutil.rmtree(base, ignore_errors=True)
        if server is not None:
            server.stop()
    return _report(args, prov, runs, rows * dim * 4 * world)


def _report(
    args: argparse.Namespace, prov: dict[str, Any], runs: dict[str, Any], state: int
) -> dict[str, Any]:
    b = {k: median(v) for k, v in runs["blocking"].items()}
    r = {k: median(v) for k, v in runs["restart"].items()}
    figures = {
        "blocking: memory tier (copy) / sync disk save": b["memory_copy_s"] / b["sync_s"],
        "blocking: memory tier (fork) / sync disk save": b["memory_fork_s"] / b["sync_s"],
        "restart: cold local disk / memory": r["local"] / r["memory"],
        "restart: S3 / memory": r["durable"] / r["memory"],
        "time to durable s": median(runs["to_durable_s"]),
        "steps lost per failure (max)": float(max(runs["steps_lost"])),
        "throughput: tiers on / off": runs["steps_per_s"]["on"] / runs["steps_per_s"]["off"],
    }
    targets = {
        "blocking: memory tier (copy) / sync disk save": f"<= {TARGETS['blocking']}",
        "restart: cold local disk / memory": f">= {TARGETS['restart']}",
        "steps lost per failure (max)": f"<= {TARGETS['lost']}",
        "throughput: tiers on / off": f">= {TARGETS['throughput']}",
    }
    met = {
        "blocking": figures["blocking: memory tier (copy) / sync disk save"] <= TARGETS["blocking"],
        "restart": figures["restart: cold local disk / memory"] >= TARGETS["restart"],
        "lost": figures["steps lost per failure (max)"] <= TARGETS["lost"],
        "throughput": figures["throughput: tiers on / off"] >= TARGETS["throughput"],
    }
    doc = {
        "provenance": prov,
        "state_bytes": state,
        "procs": args.procs,
        "cadence": {"memory": args.mem_every, "local": args.local_every, "durable": args.durable_every},
        "durable": "local folder" if args.no_s3 else "S3 (moto, 127.0.0.1)",
        "ratios": figures,
        "targets": targets,
        "met": met,
        "median_seconds": {
            **{f"blocking {k}": v for k, v in b.items()},
            **{f"restart from {k}": v for k, v in r.items()},
        },
        "runs": runs,
    }
    table = [
        (k, f"{v:.3f}" + (f" (target {targets[k]})" if k in targets else "")) for k, v in figures.items()
    ]
    table += [(f"median {k} s", f"{v:.3f}") for k, v in doc["median_seconds"].items()]
    profile = {k: median(v) for k, v in runs.get("restart_profile", {}).items()}
    if profile:
        doc["restart_profile_median_s"] = profile
        table += [
            (
                "restart from memory: restore_latest s (of the restart to first step)",
                f"{profile['restore_s']:.3f}",
            ),
            (
                "the same checkpoint: restore_model s, verified / unverified",
                (f"{profile['direct_verified_s']:.3f} / {profile['direct_unverified_s']:.3f}"),
            ),
            ("the same checkpoint: its files read raw s", f"{profile['raw_read_s']:.3f}"),
        ]
    table += [("steps lost per kill", ", ".join(map(str, runs["steps_lost"])))]
    table += [("steps/s off, on", f"{runs['steps_per_s']['off']:.2f}, {runs['steps_per_s']['on']:.2f}")]
    charts = [
        Chart(
            {f"reckpt memory tier ({k[7:11]})": b[k] for k in ("memory_copy_s", "memory_fork_s")}
            | {"sync save to disk": b["sync_s"]},
            "seconds the caller blocks (lower is better)",
            "blocking",
        ),
        Chart(
            {f"reckpt restart from {k}": v for k, v in r.items()},
            "seconds to the first step (lower is better)",
            "restart to first step",
        ),
        Chart(
            {"reckpt tiers on": runs["steps_per_s"]["on"], "checkpointing off": runs["steps_per_s"]["off"]},
            "training steps / s (higher is better)",
            "throughput",
        ),
    ]
    write_results(
        args.out, args.name, doc, table, charts, f"tiers: {state / 1e9:.2f} GB on {args.procs} processes"
    )
    return doc


if __name__ == "__main__":
    print(json.dumps(main()["ratios"], indent=1))
