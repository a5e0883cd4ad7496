"""Save and restore throughput of the reference trainer's model against the disk and the usual baselines.

``python benchmarks/save_restore.py --size-mb 1024 --procs 2`` builds the reference trainer's
DLRM (TorchRec embedding tables sharded by DistributedModelParallel, fused row-wise Adagrad,
Adam for the dense part) on the meta device, so no rank ever holds an unsharded copy, with
about ``--size-mb`` MiB of fp32 state (weights plus optimizer state) over ``--procs`` gloo
processes. Every rank then writes and reads its own share, all ranks at once, timed from a
barrier to a barrier:

- the disk's limit: a raw sequential write (``write`` + ``fsync``) and read of the rank's
  bytes; also the raw write with early writeback (``sync_file_range`` per 16 MiB), the
  fastest way this disk takes the bytes;
- ``torch.save``/``torch.load`` and safetensors of the rank's tensors (fsync'd);
- plain DCP as TorchEasyRec calls it (``dcp.save(model.state_dict())`` and the optimizer's,
  default ``FileSystemWriter``: ``thread_count=1``, fsync) and with ``thread_count`` 2 and 4;
  loads into the live state dicts, as TorchEasyRec does;
- reckpt: ``save_model`` (checksums, manifest, commit) and ``restore_model`` with its default
  verification (data files hashed while read), with ``verify="first"`` and ``verify=False``.

Every writer fsyncs. Every read starts cold: rank 0 fsyncs every file and calls
``posix_fadvise(POSIX_FADV_DONTNEED)`` on it, then ``os.sync``. Before each measurement the
page cache is synced and the disk left idle for ``--pause`` seconds, and the writers run in a
rotating order, because this kind of disk slows down under sustained writing. Peak extra
resident memory of reckpt's save is read from ``VmHWM`` (reset through
``/proc/self/clear_refs``); the checksum cost is the time writers spent on hashing that the
I/O did not hide (``reckpt.format.integrity.hash_wait_seconds``). Medians of ``--repeats`` rounds.
Writes ``<out>/<name>.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
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

TABLES, DIM = 4, 64
_PIECE = 16 << 20


def rows_for(size_mb: float) -> int:
    """Rows per table so that weights + row-wise Adagrad state come to ``size_mb`` MiB."""
    per_row = 4 * (DIM + 1)  # fp32 weights + one momentum value per row
    return max(16, int(size_mb * (1 << 20) / (TABLES * per_row)))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def peak_extra_rss(fn: Callable[[], Any]) -> int:
    """Peak resident memory above the starting level while ``fn`` runs (``VmHWM`` after a reset)."""
    base = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass
    fn()
    return max(0, _status_kb("VmHWM") - base)


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


def _raw_write(path: str, blobs: list[memoryview], writeback: bool) -> None:
    from reckpt.storage.writeback import start_writeback

    with open(path, "wb", buffering=0) as f:
        offset = 0
        for blob in blobs:
            for start in range(0, len(blob), _PIECE):
                piece = blob[start : start + _PIECE]
                f.write(piece)
                if writeback:
                    start_writeback(f.fileno(), offset, len(piece))
                offset += len(piece)
        os.fsync(f.fileno())


def _raw_read(path: str, buf: memoryview) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


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
    from reckpt.format.integrity import hash_wait_seconds
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
    times: dict[str, list[float]] = {}
    extra: dict[str, list[float]] = {}
    read_buf = memoryview(bytearray(_PIECE))

    def timed(name: str, fn: Callable[[], Any], cold: str | None = None) -> float:
        dist.barrier()
        if rank == 0:
            if cold is not None:
                drop_cache(cold)
            os.sync()
            time.sleep(a["pause"])
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        secs = time.perf_counter() - start
        times.setdefault(name, []).append(secs)
        return secs

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

    def one_round(rep: int) -> None:
        d = os.path.join(a["work"], f"r{rep}")
        if rank == 0:
            os.makedirs(d)
        dist.barrier()
        ck = f"{d}/run/model.ckpt-1"
        writers: list[tuple[str, Callable[[], Any]]] = [
            ("raw write", lambda: _raw_write(f"{d}/raw-{rank}.bin", blobs, False)),
            ("raw write (early writeback)", lambda: _raw_write(f"{d}/rawwb-{rank}.bin", blobs, True)),
            ("torch.save", lambda: torch_save(f"{d}/ts-{rank}.pt")),
            ("safetensors save", lambda: st_save(f"{d}/st-{rank}.safetensors")),
            ("reckpt save", lambda: reckpt.save_model(ck, model, opt)),
        ]
        for tc in (1, 2, 4):
            writers.append((f"DCP save (thread_count={tc})", lambda tc=tc: dcp_save(f"{d}/dcp{tc}", tc)))
        turn = rep * 3 % len(writers)
        for name, fn in writers[turn:] + writers[:turn]:
            if name != "reckpt save":
                timed(name, fn)
                continue
            hashed = hash_wait_seconds()
            rss = peak_extra_rss(lambda name=name, fn=fn: timed(name, fn))
            extra.setdefault("hash_wait_s", []).append(hash_wait_seconds() - hashed)
            extra.setdefault("peak_extra_rss", []).append(float(rss))
        start = time.perf_counter()
        for blob in blobs:
            xxhash.xxh3_64_hexdigest(blob)
        extra.setdefault("xxh3_serial_s", []).append(time.perf_counter() - start)
        readers: list[tuple[str, Callable[[], Any]]] = [
            ("raw read", lambda: _raw_read(f"{d}/raw-{rank}.bin", read_buf)),
            ("torch.load", lambda: torch.load(f"{d}/ts-{rank}.pt", weights_only=True)),
            ("safetensors load", lambda: st_read(f"{d}/st-{rank}.safetensors")),
            ("DCP load (TorchEasyRec)", lambda: dcp_load(f"{d}/dcp1")),
            ("reckpt restore (verified)", lambda: reckpt.restore_model(ck, model, opt)),
            ("reckpt restore (verify='first')", lambda: reckpt.restore_model(ck, model, opt, verify="first")),
            ("reckpt restore (verify=False)", lambda: reckpt.restore_model(ck, model, opt, verify=False)),
        ]
        for name, fn in readers:
            timed(name, fn, cold=d)
        dist.barrier()
        if rank == 0:
            shutil.rmtree(d)

    for rep in range(a["repeats"]):
        one_round(rep)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, {"bytes": local_bytes, "extra": extra})
    if rank == 0:
        doc = {
            "times": times,
            "state_bytes": sum(g["bytes"] for g in gathered),
            "per_rank_bytes": [g["bytes"] for g in gathered],
            "extra": [g["extra"] for g in gathered],
        }
        with open(a["report"], "w") as f:
            json.dump(doc, f)
    dist.barrier()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=float, default=1024, help="MiB of fp32 state (weights + optimizer)")
    p.add_argument("--procs", type=int, default=1, help="gloo processes sharing the tables")
    p.add_argument("--repeats", type=int, default=3)
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
    need = int(a.size_mb * (1 << 20) * 9.5)  # eight writers' files plus slack, one round at a time
    try:
        require_free_space(work, need)
        prov = provenance(work)
        report = os.path.join(work, "report.json")
        init_file = os.path.join(work, "rdzv")
        args = {
            "rows": rows_for(a.size_mb),
            "repeats": a.repeats,
            "pause": a.pause,
            "work": work,
            "report": report,
        }
        mp.start_processes(_worker, args=(a.procs, init_file, args), nprocs=a.procs, start_method="spawn")
        with open(report) as f:
            raw = json.load(f)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _report(a, prov, raw)


def _ratio_table(med: dict[str, float], nbytes: int, extra: dict[str, float]) -> dict[str, float]:
    dcp_best = min((k for k in med if k.startswith("DCP save")), key=lambda k: med[k])
    save = med["reckpt save"]
    return {
        "save / raw write (target >= 0.8)": med["raw write"] / save,
        f"save / best plain DCP [{dcp_best}] (target >= 0.95)": med[dcp_best] / save,
        "save / DCP default (thread_count=1)": med["DCP save (thread_count=1)"] / save,
        "save / raw write with early writeback": med["raw write (early writeback)"] / save,
        "restore verified / raw read (target >= 0.8)": med["raw read"] / med["reckpt restore (verified)"],
        "restore verified / DCP load": med["DCP load (TorchEasyRec)"] / med["reckpt restore (verified)"],
        "restore verify='first' / raw read": med["raw read"] / med["reckpt restore (verify='first')"],
        "restore verify=False / raw read": med["raw read"] / med["reckpt restore (verify=False)"],
        "checksum cost: hashing not hidden by I/O / save time (target <= 0.05)": extra["hash_wait_s"] / save,
        "checksum, if hashed serially: xxh3 time / save time": extra["xxh3_serial_s"] / save,
        "peak extra RSS during save / state (target <= 0.25)": extra["peak_extra_rss"] / nbytes,
    }


def _report(a: argparse.Namespace, prov: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
    nbytes = int(raw["state_bytes"])
    med = {k: median(v) for k, v in raw["times"].items()}
    gbps = {k: nbytes / v / 1e9 for k, v in med.items()}
    # per figure: the worst rank's median (hashing waits, memory per rank's own share)
    per_rank = raw["extra"]
    extra = {
        "hash_wait_s": max(median(e["hash_wait_s"]) for e in per_rank),
        "xxh3_serial_s": max(median(e["xxh3_serial_s"]) for e in per_rank),
        "peak_extra_rss": max(median(e["peak_extra_rss"]) for e in per_rank),
    }
    ratios = _ratio_table(med, max(raw["per_rank_bytes"]) if per_rank else nbytes, extra)
    doc = {
        "provenance": prov,
        "workload": {
            "model": "reference trainer DLRM (TorchRec EBC, DMP table-wise sharding, fused row-wise Adagrad,"
            " Adam dense), built on the meta device",
            "tables": TABLES,
            "rows_per_table": rows_for(a.size_mb),
            "dim": DIM,
            "procs": a.procs,
            "repeats": a.repeats,
        },
        "state_bytes": nbytes,
        "per_rank_bytes": raw["per_rank_bytes"],
        "page_cache": (
            "every read starts cold: fsync + posix_fadvise(DONTNEED) on every file, then os.sync;"
            " before each measurement os.sync and a pause of --pause seconds"
        ),
        "notes": [
            "ratios are throughput ratios (baseline seconds / reckpt seconds): above 1, reckpt is faster",
            "safetensors load reads the whole file into memory (safetensors.torch.load): a real read",
            "peak extra RSS and hashing waits are per rank (the worst rank), against that rank's bytes",
        ],
        "median_seconds": med,
        "gb_per_s": gbps,
        "ratios": ratios,
        "extra_medians": extra,
        "runs": raw["times"],
        "runs_per_rank": raw["extra"],
    }
    table = [(k, f"{med[k]:.3f} s, {gbps[k]:.2f} GB/s") for k in med]
    table += [
        ("reckpt save: hashing not hidden by I/O", f"{extra['hash_wait_s']:.4f} s"),
        ("reckpt save: peak extra RSS (worst rank)", human_bytes(extra["peak_extra_rss"])),
    ]
    table += [(k, f"{v:.3f}") for k, v in ratios.items()]
    title = f"{human_bytes(nbytes)} on {a.procs} process(es): cold reads, fsync'd writes"
    chart = Chart({k: gbps[k] for k in med}, "GB/s (higher is better)")
    write_results(a.out, a.name, doc, table, chart=chart, chart_title=f"{a.name}: {title}")
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    return doc


if __name__ == "__main__":
    main()
