"""Save and restore of state on a CUDA device: reckpt against torch.save and plain DCP.

``python -m benchmarks.gpu_save_restore --size-gb 4`` builds embedding-like tables on
``cuda:0`` plus their Adagrad state (about half the bytes each), then, in rounds whose order
rotates, measures:

- ``torch.save`` of both state dicts (fsync) and ``torch.load(map_location="cuda:0")``;
- plain DCP (``dcp.save`` / ``dcp.load`` of the live state dicts, default writer);
- reckpt's ``save_model`` and ``restore_model`` (checksums, manifest, commit, verified reads);
- reckpt's async save: the caller's stall (the copies into pinned buffers are only queued),
  the time until they have landed (``torch.cuda.synchronize``), and until the commit;
- the upload path of a restore on its own: a file of the state's bytes read cold into
  pageable memory and moved with ``.to(device)``, against :class:`reckpt.save.device_copy.PinnedLoader`
  (two pinned buffers, uploads overlapping reads).

Every read starts cold (the files are evicted from the page cache). Writes
``benchmarks/results/gpu_save_restore.json`` and ``.md``. Without a CUDA device it prints
"no CUDA device: skipped", writes nothing and exits with status 0.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reckpt
from benchmarks.common import drop_cache, human_bytes, median, provenance, require_free_space, write_results
from reckpt.save.device_copy import PinnedLoader


class Tables(nn.Module):
    """``tables`` embedding tables with ``nbytes`` bytes of fp32 weights on ``device``."""

    def __init__(self, nbytes: int, device: torch.device, tables: int = 4, dim: int = 128) -> None:
        super().__init__()
        rows = max(1, nbytes // (4 * dim * tables))
        self.tables = nn.ModuleList(nn.Embedding(rows, dim, device=device) for _ in range(tables))


def build(size_gb: float, device: torch.device) -> tuple[Tables, torch.optim.Optimizer]:
    """The model and an Adagrad optimizer whose state exists (one step on small gradients)."""
    torch.manual_seed(0)
    model = Tables(int(size_gb * 1e9 / 2), device)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.01)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    for p in model.parameters():
        p.grad = None
    torch.cuda.synchronize(device)
    return model, opt


def cuda_timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds ``fn()`` took, including the device work it queued."""
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    return time.perf_counter() - start


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    tensors = list(model.state_dict().values())
    tensors += [
        v for s in opt.state_dict()["state"].values() for v in s.values() if isinstance(v, torch.Tensor)
    ]
    return sum(t.numel() * t.element_size() for t in tensors)


def fingerprint(model: nn.Module) -> list[float]:
    """A cheap summary of the weights, to check that a restore brought them back."""
    return [float(p.double().sum()) for p in model.parameters()]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=4.0, help="GB of weights plus optimizer state")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (the median is reported)")
    parser.add_argument("--workdir", default=None, help="where files are written (default: a temp dir)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: skipped (nothing measured, nothing written)")
        return {}

    device = torch.device("cuda:0")
    base = args.workdir or tempfile.mkdtemp(prefix="reckpt-gpu-bench-")
    os.makedirs(base, exist_ok=True)
    require_free_space(base, int(4 * args.size_gb * 1e9))
    prov = provenance(base)
    prov["device"] = torch.cuda.get_device_name(device)
    model, opt = build(args.size_gb, device)
    nbytes = state_bytes(model, opt)
    want = fingerprint(model)
    runs: dict[str, list[float]] = {}
    checks: dict[str, bool] = {}

    def add(key: str, value: float) -> None:
        runs.setdefault(key, []).append(value)

    def perturb() -> None:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(2.0)

    def restored(name: str) -> None:
        checks[name] = checks.get(name, True) and fingerprint(model) == want

    def torch_round(d: str) -> None:
        path = os.path.join(d, "state.pt")
        with open(path, "wb") as f:
            add(
                "torch.save s",
                cuda_timed(lambda: torch.save({"m": model.state_dict(), "o": opt.state_dict()}, f), device),
            )
            f.flush()
            os.fsync(f.fileno())
        drop_cache(path)
        perturb()
        got: dict[str, Any] = {}
        add(
            "torch.load s",
            cuda_timed(lambda: got.update(torch.load(path, map_location=device, weights_only=True)), device),
        )
        model.load_state_dict(got["m"])
        restored("torch.load")

    def dcp_round(d: str) -> None:
        def save() -> None:
            dcp.save(model.state_dict(), checkpoint_id=os.path.join(d, "model"))
            dcp.save(opt.state_dict(), checkpoint_id=os.path.join(d, "optimizer"))

        add("DCP save s", cuda_timed(save, device))
        drop_cache(d)
        perturb()

        def load() -> None:
            sd = model.state_dict()
            dcp.load(sd, checkpoint_id=os.path.join(d, "model"))
            model.load_state_dict(sd)
            osd = opt.state_dict()
            dcp.load(osd, checkpoint_id=os.path.join(d, "optimizer"))
            opt.load_state_dict(osd)

        add("DCP load s", cuda_timed(load, device))
        restored("DCP load")

    def reckpt_round(d: str) -> None:
        ck = os.path.join(d, "model.ckpt-1")
        add("reckpt save s", cuda_timed(lambda: reckpt.save_model(ck, model, opt), device))
        drop_cache(ck)
        perturb()
        add("reckpt restore s", cuda_timed(lambda: reckpt.restore_model(ck, model, opt), device))
        restored("reckpt restore")

    def async_round(d: str) -> None:
        mgr = reckpt.CheckpointManager(os.path.join(d, "run"), async_save=True)
        try:
            for step in (1, 2):  # the first save allocates the pinned buffers
                torch.cuda.synchronize(device)
                start = time.perf_counter()
                mgr.save(step, model, opt)
                stall = time.perf_counter() - start
                torch.cuda.synchronize(device)
                landed = time.perf_counter() - start
                mgr.wait()
                total = time.perf_counter() - start
                tag = "first " if step == 1 else ""
                add(f"async {tag}stall s", stall)
                add(f"async {tag}copies landed s", landed)
                add(f"async {tag}total s", total)
        finally:
            mgr.close()
        perturb()
        reckpt.restore_model(os.path.join(d, "run", "model.ckpt-2"), model, opt)
        restored("async save, restored")

    def upload_round(d: str) -> None:
        flat = torch.cat([p.detach().reshape(-1).view(torch.uint8) for p in model.parameters()]).cpu()
        path = os.path.join(d, "raw.bin")
        flat.numpy().tofile(path)
        del flat
        drop_cache(path)
        target = torch.empty(os.path.getsize(path), dtype=torch.uint8, device=device)

        def pageable() -> None:
            host = torch.empty(target.numel(), dtype=torch.uint8)
            view = memoryview(host.numpy())
            with open(path, "rb", buffering=0) as f:
                done = 0
                while done < len(view):  # one read() returns at most 2 GiB
                    got = f.readinto(view[done:])
                    if not got:
                        break
                    done += got
            target.copy_(host.to(device))

        add("upload, pageable read + .to(device) s", cuda_timed(pageable, device))
        drop_cache(path)
        loader = PinnedLoader()

        def pinned() -> None:
            with open(path, "rb", buffering=0) as f:
                loader.load(target, f.readinto)
            loader.finish()

        add("upload, PinnedLoader s", cuda_timed(pinned, device))
        loader.close()

    units = [
        ("torch", torch_round),
        ("dcp", dcp_round),
        ("reckpt", reckpt_round),
        ("async", async_round),
        ("upload", upload_round),
    ]
    try:
        for r in range(args.rounds):
            order = units[r % len(units) :] + units[: r % len(units)]
            for name, fn in order:
                d = os.path.join(base, f"r{r}-{name}")
                os.makedirs(d)
                fn(d)
                shutil.rmtree(d)
    finally:
        if args.workdir is None:
            shutil.rmtree(base, ignore_errors=True)

    figures: dict[str, float] = {"state_bytes": float(nbytes)}
    figures.update({k: median(v) for k, v in runs.items()})
    for op in ("torch.save", "DCP save", "reckpt save", "torch.load", "DCP load", "reckpt restore"):
        figures[f"{op} GB/s"] = nbytes / figures[f"{op} s"] / 1e9
    figures["async stall / reckpt save"] = figures["async stall s"] / figures["reckpt save s"]
    figures["async copies landed / reckpt save"] = figures["async copies landed s"] / figures["reckpt save s"]
    doc = {
        "provenance": prov,
        "figures": figures,
        "restores_exact": checks,
        "runs": runs,
        "note": (
            "seconds include the device work each call queued (torch.cuda.synchronize); reads are"
            " cold; async stall: the caller's block, copies landed: until the pinned copies are"
            " complete (training kernels queued after the save wait for them on the device)"
        ),
    }
    table = [(k, f"{v:.4f}") for k, v in figures.items()]
    table += [(f"restore exact: {k}", str(v)) for k, v in checks.items()]
    write_results(args.out, "gpu_save_restore", doc, table)
    print(
        f"{human_bytes(nbytes)} on {prov['device']}: reckpt save {figures['reckpt save s']:.2f}s,"
        f" restore {figures['reckpt restore s']:.2f}s, async stall {figures['async stall s']:.3f}s"
    )
    return figures


if __name__ == "__main__":
    main()
