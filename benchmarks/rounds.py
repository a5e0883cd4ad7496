"""Rounds of measurements across gloo ranks: barrier-to-barrier timing, rotation, memory guard.

Used by :mod:`benchmarks.save_restore`: every figure is timed on every rank at once, from a
barrier to a barrier, after the page cache was synced (and, for reads, the files evicted)
and the disk left idle; its peak extra resident memory is read from ``VmHWM``. Rounds run
their figures in rotated orders, and baselines that would not fit in memory are skipped.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from benchmarks.common import drop_cache, reset_peak_rss, status_bytes

__all__ = ["MEMORY_FACTORS", "MEMORY_HEADROOM", "Recorder", "peak_extra_rss", "rotated", "skipped_for_memory"]

MEMORY_HEADROOM = 2 << 30  # left to the rest of the machine when deciding what fits
# extra resident memory of the memory-hungry baselines, in multiples of the state's bytes
MEMORY_FACTORS = {
    "torch.load": 1.0,  # a second copy of every tensor
    "safetensors save": 1.0,  # every tensor as bytes, all at once
    "safetensors load": 2.0,  # the whole file, then the tensors
    "reckpt save (async, copy)": 1.0,  # the host copy of the state
}


def peak_extra_rss(fn: Callable[[], Any]) -> int:
    """Peak resident memory above the starting level while ``fn`` runs (``VmHWM`` after a reset)."""
    base = status_bytes("VmRSS")
    reset_peak_rss()
    fn()
    return max(0, status_bytes("VmHWM") - base)


def rotated(units: list[Any], rep: int, repeats: int) -> list[Any]:
    """``units`` rotated for round ``rep``: the rounds start at evenly spread positions."""
    if not units:
        return units
    turn = rep * max(1, len(units) // max(1, repeats)) % len(units)
    return units[turn:] + units[:turn]


def skipped_for_memory(state_bytes: int, available: int) -> dict[str, str]:
    """The memory-hungry baselines that do not fit in ``available`` bytes, with the reason."""
    out = {}
    for name, factor in MEMORY_FACTORS.items():
        need = int(factor * state_bytes)
        if need > available - MEMORY_HEADROOM:
            out[name] = (
                f"skipped: needs {need / 1e9:.1f} GB more memory, {available / 1e9:.1f} GB available"
                f" (keeping {MEMORY_HEADROOM / 2**30:.0f} GiB of headroom)"
            )
    return out


class Recorder:
    """Times one figure from a barrier to a barrier, with its peak extra memory, on every rank."""

    def __init__(self, rank: int, pause: float) -> None:
        self.rank, self.pause = rank, pause
        self.times: dict[str, list[float]] = {}
        self.rss: dict[str, list[float]] = {}
        self.extra: dict[str, list[float]] = {}

    def add(self, key: str, value: float) -> None:
        self.extra.setdefault(key, []).append(float(value))

    def __call__(self, name: str, fn: Callable[[], Any], cold: str | None = None) -> None:
        dist.barrier()
        if self.rank == 0:
            if cold is not None:
                drop_cache(cold)
            os.sync()
            time.sleep(self.pause)
        base = status_bytes("VmRSS")
        reset_peak_rss()
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        self.times.setdefault(name, []).append(time.perf_counter() - start)
        self.rss.setdefault(name, []).append(float(max(0, status_bytes("VmHWM") - base)))

    def discard(self, path: str | None) -> None:
        """Delete a writer's output once every rank is done with it (rank 0)."""
        if path is None:
            return
        dist.barrier()
        if self.rank == 0:
            shutil.rmtree(path, ignore_errors=True)
