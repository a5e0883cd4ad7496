"""Run a test scenario on N real gloo processes (spawned; file rendezvous, no ports)."""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import time
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, init_file: str, target: str, args: tuple[Any, ...]) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        module, _, name = target.rpartition(".")
        getattr(importlib.import_module(module), name)(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # The scenario passed and the group is down. Skip interpreter teardown: destroying gloo's
    # and DeviceMesh's C++ objects in arbitrary order at exit sometimes aborts a process
    # ("terminate called without an active exception") after all the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_world(world: int, target: str, *args: Any, timeout_s: float = 300.0) -> None:
    """Run ``target(rank, world, *args)`` on ``world`` gloo processes; re-raise any failure.

    A rank that hangs (e.g. a peer crashed outside a collective) fails the test after
    ``timeout_s`` instead of hanging the suite.
    """
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rdzv")
        ctx = mp.start_processes(
            _entry, args=(world, init_file, target, args), nprocs=world, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"{target} on {world} processes did not finish in {timeout_s}s")
