"""Unsharded load: a 2-process TorchRec checkpoint into a plain one-process model, RSS measured.

Two gloo processes shard an EmbeddingBagCollection (row-, column-, table-wise and
data-parallel tables) plus a dense MLP and save it with ``reckpt.save_model``. Then, each in a
fresh subprocess, a plain (unsharded) copy of the model is built and filled by

* ``reckpt.sharding.load_unsharded`` (one table at a time),
* ``reckpt.restore_model`` (all keys in one DCP load),
* plain ``torch.distributed.checkpoint.load`` of the whole state dict (baseline),

measuring the resident memory above the built model (peak RSS during the load minus the RSS
before it; the kernel's peak is reset first) and the time. Every load is checked bit for bit
against the trained weights. The bound checked is ``largest table + dense part + 64 MB``.
Writes ``benchmarks/results/unsharded_load.json``, ``.md`` and ``.png``.

Usage: ``python -m benchmarks.unsharded_load --tables 6 --table-mb 128 --dense-mb 16``
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks.common import Chart, provenance, require_free_space, write_results

METHODS = ("load_unsharded", "restore_model", "dcp_load")
SHARDINGS = ("row_wise", "column_wise", "table_wise", "data_parallel")
DIM = 64
SLACK_MB = 64


def _rows(table_mb: float) -> int:
    return max(8, int(table_mb * (1 << 20) / (DIM * 4)))


def _hidden(dense_mb: float) -> int:
    return max(4, int(math.sqrt(dense_mb * (1 << 20) / 4 / 2)))


def build_plain(tables: int, table_mb: float, dense_mb: float, seed: int) -> Any:
    """The unsharded model: ``tables`` tables of ``table_mb`` each and a two-layer MLP."""
    import torch
    from torch import nn
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    torch.manual_seed(seed)
    h = _hidden(dense_mb)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ebc = EmbeddingBagCollection(
                tables=[
                    EmbeddingBagConfig(
                        name=f"t{i}",
                        embedding_dim=DIM,
                        num_embeddings=_rows(table_mb),
                        feature_names=[f"f{i}"],
                    )
                    for i in range(tables)
                ],
                device=torch.device("cpu"),
            )
            self.dense = nn.Sequential(nn.Linear(h, h), nn.Linear(h, h))

    return Model()


def _fingerprints(state: dict[str, Any]) -> dict[str, str]:
    import xxhash

    return {k: xxhash.xxh3_64_hexdigest(v.contiguous().numpy().tobytes()) for k, v in state.items()}


def _writer(rank: int, world: int, init_file: str, ckpt: str, spec: tuple[int, float, float]) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology

    import reckpt

    class RowWiseOnCpu(EmbeddingBagCollectionSharder):
        def sharding_types(self, compute_device_type: str) -> list[str]:
            return [*super().sharding_types(compute_device_type), "row_wise"]

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    tables, table_mb, dense_mb = spec
    model = build_plain(tables, table_mb, dense_mb, seed=1)
    constraints = {
        f"t{i}": ParameterConstraints(sharding_types=[SHARDINGS[i % len(SHARDINGS)]], min_partition=DIM // 2)
        for i in range(tables)
    }
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world, compute_device="cpu"), constraints=constraints
    )
    sharders: list[Any] = [RowWiseOnCpu()]
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)
    reckpt.save_model(ckpt, dmp)
    full: dict[str, Any] = {}
    for key, value in dmp.state_dict().items():
        if hasattr(value, "local_shards"):
            out = torch.zeros(tuple(value.size())) if rank == 0 else None
            value.gather(dst=0, out=out, dtype=torch.float32)
            full[key] = out
        else:
            full[key] = value.detach()
    if rank == 0:
        with open(os.path.join(ckpt, "..", "fingerprints.json"), "w", encoding="utf-8") as f:
            json.dump(_fingerprints(full), f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def write_checkpoint(ckpt: str, tables: int, table_mb: float, dense_mb: float) -> None:
    """Save the sharded model from two gloo processes."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _writer,
            args=(2, os.path.join(tmp, "rdzv"), ckpt, (tables, table_mb, dense_mb)),
            nprocs=2,
            start_method="spawn",
        )


def _rss_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(method: str, ckpt: str, tables: int, table_mb: float, dense_mb: float) -> dict[str, Any]:
    """In this (fresh) process: build the plain model, load with ``method``, report RSS and time."""
    import torch.distributed.checkpoint as dcp

    import reckpt
    from reckpt.sharding.unsharded import load_unsharded  # noqa: F401  (imported before measuring)

    model = build_plain(tables, table_mb, dense_mb, seed=2)
    loads = {
        "load_unsharded": lambda: reckpt.sharding.load_unsharded(ckpt, model),
        "restore_model": lambda: reckpt.restore_model(ckpt, model),
        "dcp_load": lambda: dcp.load(
            model.state_dict(), checkpoint_id=os.path.join(ckpt, "model"), no_dist=True
        ),
    }
    gc.collect()
    before_kb = _rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # reset VmHWM, the peak RSS, to the current RSS
    start = time.perf_counter()
    loads[method]()
    seconds = time.perf_counter() - start
    peak_kb = _rss_kb("VmHWM")
    with open(os.path.join(ckpt, "..", "fingerprints.json"), encoding="utf-8") as f:
        want = json.load(f)
    got = _fingerprints({k: v.detach() for k, v in model.state_dict().items()})
    sizes = [p.numel() * p.element_size() for p in model.ebc.parameters()]
    dense = sum(p.numel() * p.element_size() for p in model.dense.parameters())
    return {
        "method": method,
        "seconds": seconds,
        "extra_rss_mb": (peak_kb - before_kb) / 1024,
        "model_mb": (sum(sizes) + dense) / (1 << 20),
        "largest_table_mb": max(sizes) / (1 << 20),
        "dense_mb": dense / (1 << 20),
        "exact": got == want,
    }


def run_measure(method: str, ckpt: str, tables: int, table_mb: float, dense_mb: float) -> dict[str, Any]:
    """:func:`measure` in a fresh subprocess."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "benchmarks.unsharded_load", "--measure", method, "--ckpt", ckpt]
    cmd += ["--tables", str(tables), "--table-mb", str(table_mb), "--dense-mb", str(dense_mb)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", type=int, default=6)
    p.add_argument("--table-mb", type=float, default=128.0)
    p.add_argument("--dense-mb", type=float, default=16.0)
    p.add_argument("--workdir", default=None, help="where the checkpoint goes (default: a temporary folder)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--measure", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        result = measure(args.measure, args.ckpt, args.tables, args.table_mb, args.dense_mb)
        print(json.dumps(result))
        return result

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        require_free_space(work, int(2 * args.tables * args.table_mb * (1 << 20)))
        ckpt = os.path.join(work, "run", "model.ckpt-1")
        write_checkpoint(ckpt, args.tables, args.table_mb, args.dense_mb)
        results = {
            m: run_measure(m, ckpt, args.tables, args.table_mb, args.dense_mb)
            for m in args.methods.split(",")
        }
        prov = provenance(work)
    first = next(iter(results.values()))
    bound = first["largest_table_mb"] + first["dense_mb"] + SLACK_MB
    figures = {
        "bound_mb": bound,
        "within_bound": {m: r["extra_rss_mb"] <= bound for m, r in results.items()},
        "exact": {m: r["exact"] for m, r in results.items()},
    }
    target_ratios = {f"{m} extra RSS / bound": r["extra_rss_mb"] / bound for m, r in results.items()}
    base = results.get("dcp_load")
    ratios = {}
    if base is not None:
        for m, r in results.items():
            ratios[m] = {
                "extra_rss_vs_dcp_load": r["extra_rss_mb"] / max(base["extra_rss_mb"], 1e-9),
                "seconds_vs_dcp_load": r["seconds"] / max(base["seconds"], 1e-9),
            }
    doc = {
        "provenance": prov,
        "config": {
            "tables": args.tables,
            "table_mb": args.table_mb,
            "dense_mb": args.dense_mb,
            "world_saved": 2,
        },
        "results": results,
        "target_ratios": target_ratios,
        "figures": figures,
        "ratios": ratios,
    }
    table = [
        ("model (MB)", f"{first['model_mb']:.1f}"),
        ("bound: largest table + dense + 64 MB", f"{bound:.1f} MB"),
    ]
    for m, r in results.items():
        extra = f"{r['extra_rss_mb']:.1f} MB extra RSS, {r['seconds']:.2f} s, exact={r['exact']}"
        if m in ratios:
            q = ratios[m]
            extra += f" ({q['extra_rss_vs_dcp_load']:.2f}x memory,"
            extra += f" {q['seconds_vs_dcp_load']:.2f}x time of dcp_load)"
        table.append((m, extra))
    charts = [
        Chart(
            {m: r["extra_rss_mb"] for m, r in results.items()},
            "MB above the built model (lower is better)",
            "peak extra RSS during the load",
            highlight=("load_unsharded", "restore_model"),
            reference=(),
            target=bound,
            target_label="bound: largest table + dense + 64 MB",
        ),
        Chart(
            {m: r["seconds"] for m, r in results.items()},
            "seconds (lower is better)",
            "load time",
            highlight=("load_unsharded", "restore_model"),
            reference=(),
        ),
    ]
    title = f"2-process checkpoint of {first['model_mb']:.0f} MiB into a plain model"
    write_results(args.out, "unsharded_load", doc, table, charts, title)
    return doc


if __name__ == "__main__":
    main()
