"""Delta versus full checkpoints: bytes written and save time at 1, 5, 10 and 25% of rows touched.

``python benchmarks/delta.py`` (defaults: 4 tables x 1M rows x 64 dims fp32 = 1 GiB of
embeddings, sharded by TorchRec on one gloo process with fused row-wise Adagrad, and a dense
part of 10 MB counting its Adagrad state) writes ``benchmarks/results/delta.json``,
``.md`` and ``.png``. For each fraction the touched rows are drawn uniformly per table and marked through
``RowTracker.observe`` (a save's bytes and time do not depend on the rows' values); a full
``save_model`` and a ``save_delta`` on top of it are timed in the same run, and every byte
of both directories is counted (manifest, dense part, ids, optimizer rows, JSON files).
Targets at 5%: >= 15x fewer bytes and a >= 5x faster save than a full checkpoint.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reckpt
from benchmarks.common import Chart, human_bytes, median, provenance, require_free_space, timed, write_results
from reckpt.delta.row_tracker import RowTracker
from reckpt.delta.rows import global_nbytes
from reckpt.delta.save import save_delta

FRACTIONS = (0.01, 0.05, 0.10, 0.25)


class Model(nn.Module):
    def __init__(self, tables: int, rows: int, dim: int, dense_mb: float) -> None:
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

        super().__init__()
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=f"t{i}", embedding_dim=dim, num_embeddings=rows, feature_names=[f"f{i}"]
                )
                for i in range(tables)
            ],
            device=torch.device("cpu"),
        )
        # weights + Adagrad state = dense_mb: a square layer of h*h fp32 weights
        h = max(1, int(math.sqrt(dense_mb * 1e6 / 2 / 4)))
        self.dense = nn.Linear(h, h, bias=False)


def _build(args: argparse.Namespace) -> tuple[Any, Any]:
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    torch.manual_seed(0)
    model = Model(args.tables, args.rows, args.dim, args.dense_mb)
    apply_optimizer_in_backward(RowWiseAdagrad, model.ebc.parameters(), {"lr": 0.01})
    constraints = {f"t{i}": ParameterConstraints(sharding_types=["table_wise"]) for i in range(args.tables)}
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=1, compute_device="cpu"), constraints=constraints
    )
    sharders: list[Any] = [EmbeddingBagCollectionSharder()]
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda p: torch.optim.Adagrad(p, lr=0.01)
    )
    opt = CombinedOptimizer([dmp.fused_optimizer, dense])
    dmp.module.dense.weight.grad = torch.zeros_like(dmp.module.dense.weight)
    opt.step()  # materialise the dense Adagrad state
    return dmp, opt


def _bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", type=int, default=4)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows per table")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--dense-mb", type=float, default=10.0, help="dense weights + optimizer state, MB")
    parser.add_argument("--repeats", type=int, default=3, help="saves per kind and fraction (median)")
    parser.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temp dir)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)

    owns_pg = not dist.is_initialized()
    tmp = tempfile.mkdtemp(prefix="reckpt-delta-", dir=args.workdir)
    try:
        if owns_pg:
            dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=0, world_size=1)
        dmp, opt = _build(args)
        keys = [f"ebc.embedding_bags.t{i}.weight" for i in range(args.tables)]
        tracker = RowTracker(dmp)
        state_bytes = sum(global_nbytes(v) for v in dmp.state_dict().values())
        require_free_space(tmp, 3 * state_bytes)
        rows: list[dict[str, Any]] = []
        g = torch.Generator().manual_seed(0)
        for frac in FRACTIONS:
            full_s, delta_s, full_b, delta_b = [], [], [], []
            for r in range(args.repeats):
                base = os.path.join(tmp, f"model.ckpt-{2 * r}")
                full_s.append(timed(lambda base=base: reckpt.save_model(base, dmp, opt)))
                full_b.append(_bytes(base))
                tracker.clear()
                n = max(1, int(frac * args.rows))
                for key in keys:
                    tracker.observe(key, torch.randperm(args.rows, generator=g)[:n])
                delta = os.path.join(tmp, f"model.delta-{2 * r + 1}")
                delta_s.append(timed(lambda d=delta, b=base: save_delta(d, dmp, opt, tracker, b)))
                delta_b.append(_bytes(delta))
                shutil.rmtree(delta)
                shutil.rmtree(base)
            row = {
                "fraction": frac,
                "full_bytes": int(median([float(b) for b in full_b])),
                "delta_bytes": int(median([float(b) for b in delta_b])),
                "full_save_s": median(full_s),
                "delta_save_s": median(delta_s),
            }
            row["bytes_ratio"] = row["full_bytes"] / row["delta_bytes"]
            row["speedup"] = row["full_save_s"] / row["delta_save_s"]
            rows.append(row)
        tracker.close()
    finally:
        if owns_pg and dist.is_initialized():
            dist.destroy_process_group()
        shutil.rmtree(tmp, ignore_errors=True)
    at5 = next(r for r in rows if r["fraction"] == 0.05)
    doc = {
        "provenance": provenance(args.workdir or tempfile.gettempdir()),
        "config": {k: getattr(args, k) for k in ("tables", "rows", "dim", "dense_mb", "repeats")},
        "state_bytes": int(state_bytes),
        "rows": rows,
        "targets_at_5pct": {
            "bytes_ratio": at5["bytes_ratio"],
            "bytes_ratio_target": 15.0,
            "speedup": at5["speedup"],
            "speedup_target": 5.0,
        },
    }
    table = [
        (
            f"{r['fraction']:.0%} rows touched",
            f"delta {r['delta_bytes'] / 1e6:.1f} MB in {r['delta_save_s']:.3f} s vs full"
            f" {r['full_bytes'] / 1e6:.1f} MB in {r['full_save_s']:.3f} s:"
            f" {r['bytes_ratio']:.1f}x fewer bytes, {r['speedup']:.1f}x faster",
        )
        for r in rows
    ]
    charts = [
        Chart(
            {f"{r['fraction']:.0%} rows touched": r["bytes_ratio"] for r in rows},
            "full bytes / delta bytes (higher is better)",
            "bytes written: x fewer than a full checkpoint",
            highlight="5%",
            target=15.0,
            target_label="target at 5%: 15x",
        ),
        Chart(
            {f"{r['fraction']:.0%} rows touched": r["speedup"] for r in rows},
            "full save s / delta save s (higher is better)",
            "save time: x faster than a full checkpoint",
            highlight="5%",
        ),
    ]
    title = f"delta vs full checkpoints of {human_bytes(state_bytes)}"
    write_results(args.out, "delta", doc, table, charts, title)
    return doc


if __name__ == "__main__":
    main()
