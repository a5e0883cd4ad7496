"""Save and restore of the reference trainer's model against the disk's ceiling and the usual baselines.

``python -m benchmarks.save_restore --size-mb 1024 --procs 2`` builds the reference trainer's
DLRM (TorchRec embedding tables sharded by DistributedModelParallel, fused row-wise Adagrad,
Adam for the dense part) on the meta device, so no rank ever holds an unsharded copy, with
about ``--size-mb`` MiB of fp32 state (weights plus optimizer state) over ``--procs`` gloo
processes. Every rank then writes and reads its own share, all ranks at once, timed from a
barrier to a barrier. In every round:

- **the disk's ceiling** (:mod:`benchmarks.ceiling`): raw writes of the rank's bytes in 1, 2,
  4 and 8 parallel streams, each buffered, with early writeback and with ``O_DIRECT``; cold
  raw reads in 1, 2, 4 and 8 parallel streams. The ceiling is the fastest variant;
- ``torch.save``/``torch.load`` and safetensors of the rank's tensors (fsync'd);
- plain DCP as TorchEasyRec calls it (``dcp.save(model.state_dict())`` and the optimizer's,
  default ``FileSystemWriter``: ``thread_count=1``, fsync) and with ``thread_count`` 2 and 4;
  loads into the live state dicts, as TorchEasyRec does;
- reckpt: ``save_model`` (checksums, manifest, commit) and the same save without checksums
  (an internal switch, for the A/B only); async saves through ``CheckpointManager`` in both
  snapshot modes (stall and total); ``restore_model`` verified (the default), with
  ``verify="first"`` and ``verify=False``.

**Order.** The writers run in an order rotated every round, and so do the readers, because
this kind of disk slows down under sustained writing and its write-back punishes whichever
writer comes next. The two A/B pairs (save with and without checksums; verified and
unverified restore) run back to back, their order flipped every other round; their cost is
the median of the per-round ratios. Every writer fsyncs. Every read starts cold: rank 0
fsyncs every file and calls ``posix_fadvise(POSIX_FADV_DONTNEED)`` on it, then ``os.sync``.
Before each measurement the page cache is synced and the disk left idle for ``--pause``
seconds.

**Memory.** Peak extra resident memory of every figure is read from ``VmHWM`` (reset through
``/proc/self/clear_refs``) on every rank; a fork snapshot's child is sampled for its private
bytes. A baseline that would need more memory than the machine has available (safetensors'
load holds the file and the tensors; ``torch.load`` and the async copy a second copy of the
state) is skipped with the reason recorded, and the ratios that need it are reported as not
measured. Medians of ``--repeats`` rounds. Writes ``<out>/<name>.json``, ``.md`` and ``.png``
(:mod:`benchmarks.save_restore_report`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import ceiling
from benchmarks.common import children_private_bytes, memory_available, provenance, require_free_space
from benchmarks.rounds import MEMORY_FACTORS, Recorder, peak_extra_rss, rotated, skipped_for_memory
from benchmarks.save_restore_report import AB_PAIRS, report

__all__ = ["MEMORY_FACTORS", "local_tensors", "main", "peak_extra_rss", "rows_for"]

TABLES, DIM = 4, 64
DISK_FACTOR = 7.5  # files alive at once, in multiples of the state: 5 kept + 1 in flight + slack


def rows_for(size_mb: float) -> int:
    """Rows per table so that weights + row-wise Adagrad state come to ``size_mb`` MiB."""
    per_row = 4 * (DIM + 1)  # fp32 weights + one momentum value per row
    return max(16, int(size_mb * (1 << 20) / (TABLES * per_row)))


def local_tensors(parts: list[tuple[str, dict[str, Any]]], rank: int) -> dict[str, torch.Tensor]:
    """This rank's share of the bytes reckpt and DCP write: local shards, replicated ones on rank 0."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    from reckpt.dcp.writer import exact_storage_view

    out: dict[str, torch.Tensor] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, ShardedTensor):
            for i, shard in enumerate(value.local_shards()):
                out[f"{prefix}.{i}"] = exact_storage_view(shard.tensor.detach())
        elif isinstance(value, DTensor):
            out[prefix] = exact_storage_view(value.to_local().detach().contiguous())
        elif isinstance(value, torch.Tensor):
            if rank == 0 and value.numel() > 1:
                out[prefix] = exact_storage_view(value.detach().contiguous())
        elif isinstance(value, dict):
            for k, v in value.items():
                visit(f"{prefix}.{k}", v)

    for name, sd in parts:
        visit(name, sd)
    return out


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _worker(rank: int, world: int, init_file: str, a: dict[str, Any]) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _measure(rank, world, a)
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip gloo's teardown at exit (it can abort after the work is done)


def _measure(rank: int, world: int, a: dict[str, Any]) -> None:
    import torch.distributed.checkpoint as dcp
    import xxhash
    from safetensors.torch import load as st_load
    from safetensors.torch import save_file

    import reckpt
    from benchmarks.reshard_load import _config
    from reckpt.format.integrity import _unhashed_writes, hash_wait_seconds
    from reckpt.optim import init_optimizer_state
    from reckpt.save.engine import collect_parts
    from reckpt.trainer.model import build_model, shard_model

    cfg = _config(a["rows"], TABLES, DIM)
    torch.manual_seed(0)
    model, opt = shard_model(cfg, build_model(cfg, device="meta"))
    init_optimizer_state(opt)  # Adam's state exists after the first step of training
    logging.getLogger("reckpt").setLevel(logging.ERROR)
    tensors = local_tensors(collect_parts(model, opt, None, None, "name"), rank)
    blobs = [memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B") for t in tensors.values()]
    local_bytes = sum(len(b) for b in blobs)
    sizes: list[Any] = [None] * world
    dist.all_gather_object(sizes, local_bytes)
    decided: list[Any] = [None]
    if rank == 0:
        skipped = skipped_for_memory(sum(sizes), memory_available())
        direct = ceiling.direct_io_support(a["work"])
        decided = [{"skipped": skipped, "direct": direct, "available": memory_available()}]
    dist.broadcast_object_list(decided, src=0)
    skipped, direct = decided[0]["skipped"], decided[0]["direct"]
    modes = [m for m in ceiling.MODES if m != "O_DIRECT" or direct is None]
    runs = {s: ceiling.split(blobs, s) for s in ceiling.STREAMS}
    rec = Recorder(rank, a["pause"])

    def dcp_save(d: str, tc: int) -> None:
        for part, sd in (("model", model.state_dict()), ("optimizer", opt.state_dict())):
            dcp.save(sd, storage_writer=dcp.FileSystemWriter(f"{d}/{part}", thread_count=tc))

    def dcp_load(d: str) -> None:
        sd = model.state_dict()
        dcp.load(sd, checkpoint_id=f"{d}/model")
        model.load_state_dict(sd)
        osd = opt.state_dict()
        dcp.load(osd, checkpoint_id=f"{d}/optimizer")
        opt.load_state_dict(osd)

    def torch_save(path: str) -> None:
        with open(path, "wb") as f:
            torch.save(tensors, f)
            f.flush()
            os.fsync(f.fileno())

    def st_save(path: str) -> None:
        save_file(tensors, path)
        _fsync(path)

    def st_read(path: str) -> None:
        with open(path, "rb") as f:
            st_load(f.read())

    def unhashed_save(ck: str) -> None:
        with _unhashed_writes():
            reckpt.save_model(ck, model, opt)

    def async_save(mode: str, run_dir: str) -> None:
        mgr = reckpt.CheckpointManager(run_dir, async_save=True, async_snapshot=mode)
        peak, stop = [0], threading.Event()

        def sample() -> None:  # a fork's child: the pages it copied or allocated
            while not stop.wait(0.05):
                peak[0] = max(peak[0], children_private_bytes())

        sampler = threading.Thread(target=sample, daemon=True) if mode == "fork" else None
        try:
            start = time.perf_counter()
            mgr.save(1, model, opt)
            rec.add(f"async stall s ({mode})", time.perf_counter() - start)
            if sampler is not None:
                sampler.start()
            mgr.wait()
        finally:
            stop.set()
            if sampler is not None and sampler.is_alive():
                sampler.join()
            mgr.close()
        if mode == "fork":
            rec.add("fork child private bytes", peak[0])

    def one_round(rep: int) -> None:
        d = os.path.join(a["work"], f"r{rep}")
        raw_dirs = {(s, m): f"{d}/raw-{s}-{m.replace(' ', '-')}" for s in ceiling.STREAMS for m in modes}
        if rank == 0:
            for path in raw_dirs.values():
                os.makedirs(path)
        dist.barrier()
        ck = f"{d}/run/model.ckpt-1"
        read_src = f"{raw_dirs[(1, 'buffered')]}/{rank}-0.bin"
        # (name, fn, output to delete once written: None keeps it for the readers)
        Writer = tuple[str, Callable[[], Any], str | None]
        units: list[list[Writer]] = []
        for (s, m), path in raw_dirs.items():
            paths = [f"{path}/{rank}-{i}.bin" for i in range(s)]
            fn = partial(ceiling.raw_write, paths, runs[s], m)
            units.append([(ceiling.write_name(s, m), fn, None if (s, m) == (1, "buffered") else path)])
        keep_ts = "torch.load" not in skipped
        units.append([("torch.save", lambda: torch_save(f"{d}/ts-{rank}.pt"), None)])
        if "safetensors save" not in skipped:
            keep_st = "safetensors load" not in skipped
            fn = partial(st_save, f"{d}/st/{rank}.safetensors")
            units.append([("safetensors save", fn, None if keep_st else f"{d}/st")])
            if rank == 0:
                os.makedirs(f"{d}/st")
        for tc in (1, 2, 4):
            fn = partial(dcp_save, f"{d}/dcp{tc}", tc)
            units.append([(f"DCP save (thread_count={tc})", fn, None if tc == 1 else f"{d}/dcp{tc}")])
        pair: list[Writer] = [
            ("reckpt save", lambda: reckpt.save_model(ck, model, opt), None),
            ("reckpt save (no checksums)", lambda: unhashed_save(f"{d}/nock/model.ckpt-1"), f"{d}/nock"),
        ]
        units.append(pair if rep % 2 == 0 else pair[::-1])
        for mode in ("copy", "fork"):
            name = f"reckpt save (async, {mode})"
            if name not in skipped:
                units.append(
                    [(name, lambda mode=mode: async_save(mode, f"{d}/async-{mode}"), f"{d}/async-{mode}")]
                )
        dist.barrier()
        for unit in rotated(units, rep, a["repeats"]):
            for name, fn, discard in unit:
                if name == "reckpt save":
                    hashed = hash_wait_seconds()
                    rec(name, fn)
                    rec.add("hash_wait_s", hash_wait_seconds() - hashed)
                else:
                    rec(name, fn)
                rec.discard(discard)
        start = time.perf_counter()
        for blob in blobs:
            xxhash.xxh3_64_hexdigest(blob)
        rec.add("xxh3_serial_s", time.perf_counter() - start)
        readers: list[list[tuple[str, Callable[[], Any]]]] = [
            [(ceiling.read_name(s), lambda s=s: ceiling.raw_read(read_src, s))] for s in ceiling.STREAMS
        ]
        if keep_ts:
            readers.append([("torch.load", lambda: torch.load(f"{d}/ts-{rank}.pt", weights_only=True))])
        if "safetensors load" not in skipped and "safetensors save" not in skipped:
            readers.append([("safetensors load", lambda: st_read(f"{d}/st/{rank}.safetensors"))])
        readers.append([("DCP load (TorchEasyRec)", lambda: dcp_load(f"{d}/dcp1"))])
        ab = [
            ("reckpt restore (verified)", lambda: reckpt.restore_model(ck, model, opt)),
            ("reckpt restore (verify=False)", lambda: reckpt.restore_model(ck, model, opt, verify=False)),
        ]
        readers.append(ab if rep % 2 == 0 else ab[::-1])
        first = partial(reckpt.restore_model, ck, model, opt, verify="first")
        readers.append([("reckpt restore (verify='first')", first)])
        for unit in rotated(readers, rep, a["repeats"]):
            for name, fn in unit:
                rec(name, fn, cold=d)
        dist.barrier()
        if rank == 0:
            shutil.rmtree(d)

    for rep in range(a["repeats"]):
        one_round(rep)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, {"bytes": local_bytes, "extra": rec.extra, "rss": rec.rss})
    if rank == 0:
        doc = {
            "times": rec.times,
            "state_bytes": sum(g["bytes"] for g in gathered),
            "per_rank_bytes": [g["bytes"] for g in gathered],
            "extra": [g["extra"] for g in gathered],
            "rss": [g["rss"] for g in gathered],
            "skipped": skipped,
            "direct_io": direct or "supported",
            "memory_available_at_start": decided[0]["available"],
        }
        with open(a["report"], "w") as f:
            json.dump(doc, f)
    dist.barrier()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--size-mb", type=float, default=1024, help="MiB of fp32 state (weights + optimizer)")
    p.add_argument("--procs", type=int, default=1, help="gloo processes sharing the tables")
    p.add_argument("--repeats", type=int, default=5, help="rounds (the A/B medians need at least 5)")
    p.add_argument("--pause", type=float, default=2.0, help="idle seconds before each measurement")
    p.add_argument("--workdir", default=None, help="where files are written (default: a temp dir)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--name", default="save_restore")
    a = p.parse_args(argv)
    if a.procs < 1:
        p.error("--procs must be at least 1")
    if a.workdir:
        os.makedirs(a.workdir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="reckpt-sr-", dir=a.workdir)
    try:
        require_free_space(work, int(a.size_mb * (1 << 20) * DISK_FACTOR))
        prov = provenance(work)
        report_path = os.path.join(work, "report.json")
        init_file = os.path.join(work, "rdzv")
        args = {
            "rows": rows_for(a.size_mb),
            "repeats": a.repeats,
            "pause": a.pause,
            "work": work,
            "report": report_path,
        }
        mp.start_processes(_worker, args=(a.procs, init_file, args), nprocs=a.procs, start_method="spawn")
        with open(report_path) as f:
            raw = json.load(f)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    workload = {
        "model": "reference trainer DLRM (TorchRec EBC, DMP table-wise sharding, fused row-wise Adagrad,"
        " Adam dense), built on the meta device",
        "tables": TABLES,
        "rows_per_table": rows_for(a.size_mb),
        "dim": DIM,
        "procs": a.procs,
        "repeats": a.repeats,
        "ab_pairs": [list(pair) for pair in AB_PAIRS],
    }
    return report(a.out, a.name, a.procs, prov, workload, raw)


if __name__ == "__main__":
    main()
