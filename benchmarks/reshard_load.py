"""Restore of the reference trainer's sharded model: same world size versus 2 -> 1, in one run.

``python benchmarks/reshard_load.py`` (default: 4 tables x 1M rows x 64 dims fp32 = 1 GiB of
embeddings plus their fused row-wise Adagrad state and the dense part) trains nothing: it
builds the reference trainer's DLRM (TorchRec, table-wise sharding, fused optimizer), saves it
on 2 gloo processes and on 1, then restores cold (fsync + ``posix_fadvise(DONTNEED)`` on every
file first), with reckpt's default verification:

- ``1 -> 1``: the 1-process checkpoint into 1 process (the same-world-size load of the bytes
  one process reads in the 2 -> 1 case);
- ``2 -> 1``: the 2-process checkpoint into 1 process (resharding);
- ``2 -> 2``: the 2-process checkpoint into 2 processes (each reads half).

Writes ``benchmarks/results/reshard_load.json``, ``.md`` and ``.png``. Target: 2 -> 1 <= 1.3x 1 -> 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (
    Chart,
    drop_cache,
    human_bytes,
    median,
    provenance,
    require_free_space,
    write_results,
)


def _config(rows: int, tables: int, dim: int) -> Any:
    from reckpt.trainer.config import Config, DataConfig, ModelConfig

    return Config(
        data=DataConfig(dense_columns=["d0", "d1"], sparse_columns=[f"s{i}" for i in range(tables)]),
        model=ModelConfig(embedding_dim=dim, num_embeddings=rows, bottom_mlp=[32, dim], top_mlp=[32, 1]),
    )


def _worker(rank: int, world: int, init_file: str, args: dict[str, Any]) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        import reckpt
        from reckpt.trainer.model import build_model, shard_model

        cfg = _config(args["rows"], args["tables"], args["dim"])
        torch.manual_seed(0)
        model, opt = shard_model(cfg, build_model(cfg))
        times: dict[str, float] = {}
        if args["save"]:
            dist.barrier()
            start = time.perf_counter()
            reckpt.save_model(args["save"], model, opt)
            times["save"] = time.perf_counter() - start
        for ckpt in args["restore"]:
            if rank == 0:
                drop_cache(ckpt)
            dist.barrier()
            start = time.perf_counter()
            reckpt.restore_model(ckpt, model, opt)
            dist.barrier()
            times[ckpt] = time.perf_counter() - start
        if rank == 0:
            with open(args["report"], "w") as f:
                json.dump(times, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip gloo's teardown at exit (it can abort after the work is done)


def _run(world: int, workdir: str, args: dict[str, Any]) -> dict[str, float]:
    init_file = tempfile.mktemp(dir=workdir, prefix="rdzv-")
    report = os.path.join(workdir, f"report-{world}.json")
    args = {**args, "report": report}
    mp.start_processes(_worker, args=(world, init_file, args), nprocs=world, start_method="spawn")
    with open(report) as f:
        out: dict[str, float] = json.load(f)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="rows per table")
    p.add_argument("--tables", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temp dir)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="reckpt-reshard-", dir=a.workdir)
    state_bytes = a.tables * a.rows * (a.dim + 1) * 4  # weights + row-wise momentum
    require_free_space(work, 3 * state_bytes)
    shape = {"rows": a.rows, "tables": a.tables, "dim": a.dim}
    two, one = os.path.join(work, "w2", "model.ckpt-1"), os.path.join(work, "w1", "model.ckpt-1")
    runs: dict[str, list[float]] = {}
    try:
        for _ in range(a.repeats):
            t2 = _run(2, work, {**shape, "save": two, "restore": [two]})
            t1 = _run(1, work, {**shape, "save": one, "restore": [one, two]})
            for name, value in (
                ("save on 2 processes", t2["save"]),
                ("save on 1 process", t1["save"]),
                ("restore 2 -> 2", t2[two]),
                ("restore 1 -> 1", t1[one]),
                ("restore 2 -> 1", t1[two]),
            ):
                runs.setdefault(name, []).append(value)
            shutil.rmtree(os.path.dirname(two))
            shutil.rmtree(os.path.dirname(one))
        prov = provenance(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: median(v) for k, v in runs.items()}
    ratios = {
        "restore 2 -> 1 / restore 1 -> 1 (target <= 1.3)": med["restore 2 -> 1"] / med["restore 1 -> 1"],
        "restore 2 -> 1 / restore 2 -> 2": med["restore 2 -> 1"] / med["restore 2 -> 2"],
    }
    doc = {
        "provenance": prov,
        "config": {**shape, "repeats": a.repeats, "sharding": "table_wise (planner default on CPU)"},
        "state_bytes_embeddings": state_bytes,
        "page_cache": "every restore starts after fsync + posix_fadvise(DONTNEED) on each file",
        "median_seconds": med,
        "ratios": ratios,
        "runs": runs,
    }
    table = [(k, f"{v:.3f} s") for k, v in med.items()] + [(k, f"{v:.3f}") for k, v in ratios.items()]
    chart = Chart(
        med,
        "seconds (lower is better)",
        highlight="restore 2 -> 1",
        reference="restore 1 -> 1",
        target=1.3 * med["restore 1 -> 1"],
        target_label="target: 2 -> 1 <= 1.3x 1 -> 1",
    )
    title = f"sharded DLRM ({human_bytes(state_bytes)} of tables): save, cold restore with verification"
    write_results(a.out, "reshard_load", doc, table, chart, title)
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    return doc


if __name__ == "__main__":
    main()
