"""Delta versus full checkpoints: bytes written and save time at 1, 5, 10 and 25% of rows touched.

``python -m benchmarks.delta`` (defaults: 4 tables x 1M rows x 64 dims fp32 = 1 GiB of
embeddings, sharded by TorchRec on one gloo process with fused row-wise Adagrad, and a dense
part of 10 MB counting its Adagrad state) writes ``benchmarks/results/delta.json``,
``.md`` and ``.png``.

For each fraction a full checkpoint is saved once (untimed, then ``sync``) as the deltas'
parent. Each repetition draws the touched rows uniformly per table, marks them through
``RowTracker.observe`` (a save's bytes and time do not depend on the rows' values), then
times a full ``save_model`` and a ``save_delta`` on that parent. The two are interleaved and
their order alternates from one repetition to the next (and carries on across fractions),
because on a VM disk the writeback of one save slows whichever save comes next: each variant
follows the other as often as itself. Both checkpoints stay on disk until the repetition
ends. Every byte of both directories is counted (manifest, dense part, ids, optimizer rows,
JSON files); times and bytes are medians over the repetitions, and every sample is kept in
the JSON (``samples``) with its position.

Then, at 5%, two ``CheckpointManager``s in incremental mode, one synchronous and one with
``async_save=True``, save a delta each per repetition (rows looked up through the sharded
collection's forward, which their trackers hook; interleaved, alternating): the caller's
stall of an asynchronous delta against a synchronous one (``async_at_5pct``, reported).

Targets at 5%: >= 15x fewer bytes and a >= 5x faster save than a full checkpoint.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
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


def _touch(dmp: Any, tables: int, rows: int, n: int, g: torch.Generator) -> None:
    """Look up ``n`` rows of every table through the sharded collection's forward, which the
    manager's row tracker hooks (a forward alone changes no row)."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    ids = torch.cat([torch.randperm(rows, generator=g)[:n] for _ in range(tables)])
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=[f"f{i}" for i in range(tables)], values=ids, lengths=torch.ones(len(ids), dtype=torch.int32)
    )
    dmp.train()
    out = dmp.module.ebc(kjt)
    if hasattr(out, "wait"):
        out.wait()


def _full_vs_delta(
    args: argparse.Namespace, tmp: str, dmp: Any, opt: Any, keys: list[str], g: torch.Generator
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per fraction: median bytes and seconds of a full save and of a delta (interleaved, alternating)."""
    tracker = RowTracker(dmp)
    rows: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    turn = 0  # alternates the order of the two variants, across fractions too
    for frac in FRACTIONS:
        parent = os.path.join(tmp, "model.ckpt-0")
        reckpt.save_model(parent, dmp, opt)  # the deltas' parent: setup, not measured
        os.sync()
        seconds: dict[str, list[float]] = {"full": [], "delta": []}
        nbytes: dict[str, list[float]] = {"full": [], "delta": []}
        for r in range(args.repeats):
            tracker.clear()
            n = max(1, int(frac * args.rows))
            for key in keys:
                tracker.observe(key, torch.randperm(args.rows, generator=g)[:n])
            paths = {
                "full": os.path.join(tmp, f"model.ckpt-{2 * r + 1}"),
                "delta": os.path.join(tmp, f"model.delta-{2 * r + 2}"),
            }
            saves = {
                "full": lambda p=paths["full"]: reckpt.save_model(p, dmp, opt),
                "delta": lambda p=paths["delta"], b=parent: save_delta(p, dmp, opt, tracker, b),
            }
            order = ("full", "delta") if turn % 2 == 0 else ("delta", "full")
            turn += 1
            for position, kind in enumerate(order):
                seconds[kind].append(timed(saves[kind]))
                nbytes[kind].append(float(_bytes(paths[kind])))
                samples.append(
                    {
                        "fraction": frac,
                        "repeat": r,
                        "kind": kind,
                        "position": position,
                        "seconds": seconds[kind][-1],
                    }
                )
            for path in paths.values():  # both stay on disk until the repetition ends
                shutil.rmtree(path)
        shutil.rmtree(parent)
        row = {
            "fraction": frac,
            "full_bytes": int(median(nbytes["full"])),
            "delta_bytes": int(median(nbytes["delta"])),
            "full_save_s": median(seconds["full"]),
            "delta_save_s": median(seconds["delta"]),
        }
        row["bytes_ratio"] = row["full_bytes"] / row["delta_bytes"]
        row["speedup"] = row["full_save_s"] / row["delta_save_s"]
        rows.append(row)
    tracker.close()
    return rows, samples


def _async_deltas(
    args: argparse.Namespace, tmp: str, dmp: Any, opt: Any, keys: list[str], g: torch.Generator
) -> dict[str, Any]:
    """Deltas at 5% through two managers, synchronous and ``async_save=True`` (interleaved,
    alternating): how long the caller is blocked, and how long until the delta is committed."""
    policy = reckpt.delta.IncrementalPolicy(full_every=1 << 30, tables=tuple(keys))
    runs = {"sync": os.path.join(tmp, "run-sync"), "async": os.path.join(tmp, "run-async")}
    out: dict[str, list[float]] = {"sync_s": [], "async_stall_s": [], "async_total_s": []}
    with (
        reckpt.CheckpointManager(runs["sync"], incremental=policy) as sync,
        reckpt.CheckpointManager(runs["async"], async_save=True, incremental=policy) as background,
    ):
        for mgr in (sync, background):  # the chains' base: setup, not measured
            mgr.save(0, dmp, opt)
            mgr.wait()
        os.sync()
        for r in range(args.repeats):
            _touch(dmp, args.tables, args.rows, max(1, int(0.05 * args.rows)), g)  # marks both trackers
            for kind in ("sync", "async") if r % 2 == 0 else ("async", "sync"):
                if kind == "sync":
                    out["sync_s"].append(timed(lambda step=r + 1: sync.save(step, dmp, opt)))
                    continue
                start = time.perf_counter()
                background.save(r + 1, dmp, opt)
                out["async_stall_s"].append(time.perf_counter() - start)
                background.wait()
                out["async_total_s"].append(time.perf_counter() - start)
    for path in runs.values():
        shutil.rmtree(path)
    doc: dict[str, Any] = {k: median(v) for k, v in out.items()}
    doc["stall_over_sync"] = doc["async_stall_s"] / doc["sync_s"]
    doc["samples"] = out
    return doc


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", type=int, default=4)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows per table")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--dense-mb", type=float, default=10.0, help="dense weights + optimizer state, MB")
    parser.add_argument("--repeats", type=int, default=3, help="saves per kind and fraction (median)")
    parser.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temp dir)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--note", default="", help="a remark on the conditions, kept in the results")
    args = parser.parse_args(argv)

    owns_pg = not dist.is_initialized()
    tmp = tempfile.mkdtemp(prefix="reckpt-delta-", dir=args.workdir)
    try:
        if owns_pg:
            dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=0, world_size=1)
        dmp, opt = _build(args)
        keys = [f"ebc.embedding_bags.t{i}.weight" for i in range(args.tables)]
        state_bytes = sum(global_nbytes(v) for v in dmp.state_dict().values())
        require_free_space(tmp, 3 * state_bytes)
        g = torch.Generator().manual_seed(0)
        rows, samples = _full_vs_delta(args, tmp, dmp, opt, keys, g)
        background = _async_deltas(args, tmp, dmp, opt, keys, g)
    finally:
        if owns_pg and dist.is_initialized():
            dist.destroy_process_group()
        shutil.rmtree(tmp, ignore_errors=True)
    at5 = next(r for r in rows if r["fraction"] == 0.05)
    doc = {
        "provenance": provenance(args.workdir or tempfile.gettempdir()),
        "config": {k: getattr(args, k) for k in ("tables", "rows", "dim", "dense_mb", "repeats")},
        "method": "full and delta interleaved, order alternating per repetition; medians",
        "note": args.note,
        "state_bytes": int(state_bytes),
        "rows": rows,
        "samples": samples,
        "async_at_5pct": background,
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
    table.append(
        (
            "5%, CheckpointManager",
            f"sync delta {background['sync_s']:.3f} s; async delta: caller blocked"
            f" {background['async_stall_s']:.3f} s ({background['stall_over_sync']:.0%} of sync),"
            f" committed after {background['async_total_s']:.3f} s",
        )
    )
    table.append(("method", f"{doc['method']} of {args.repeats}" + (f"; {args.note}" if args.note else "")))
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
            target=5.0,
            target_label="target at 5%: 5x",
        ),
    ]
    title = f"delta vs full checkpoints of {human_bytes(state_bytes)}"
    write_results(args.out, "delta", doc, table, charts, title)
    return doc


if __name__ == "__main__":
    main()
