"""Asynchronous save: stage a consistent host copy, write and commit in the background.

The caller is blocked only while (a) the previous save in flight finishes (at most one
staged copy exists) and (b) the state is copied to host memory. Writing, checksums and
the commit then run on a background thread whose collectives use a dedicated gloo
process group, never the training group. A failure in the background is re-raised by the
next call (:meth:`AsyncSaver.wait`, the next save, or the manager's ``close()``).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["stage_state_dict", "AsyncSaver"]

logger = logging.getLogger(__name__)


def _copy_into(value: torch.Tensor, cached: Any) -> torch.Tensor:
    """Copy into the previous staging buffer when it fits (no allocation, no page faults)."""
    src = value.detach()
    if (
        isinstance(cached, torch.Tensor)
        and type(cached) is torch.Tensor
        and cached.shape == src.shape
        and cached.dtype == src.dtype
        and cached.device.type == "cpu"
    ):
        return cached.copy_(src)
    return src.to("cpu", copy=True)


@torch.no_grad()
def _stage_value(value: Any, cached: Any) -> Any:
    from torch.distributed._shard.sharded_tensor.api import ShardedTensor
    from torch.distributed._shard.sharded_tensor.shard import Shard
    from torch.distributed.tensor import DTensor

    if isinstance(value, ShardedTensor):
        old = cached.local_shards() if isinstance(cached, ShardedTensor) else []
        shards = [
            Shard(_copy_into(s.tensor, old[i].tensor if i < len(old) else None), s.metadata)
            for i, s in enumerate(value.local_shards())
        ]
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            shards, value.metadata(), process_group=value._process_group
        )
    if isinstance(value, DTensor):
        old_local = cached.to_local() if isinstance(cached, DTensor) else None
        local = _copy_into(value.to_local(), old_local)
        return DTensor.from_local(
            local,
            value.device_mesh,
            value.placements,
            run_check=False,
            shape=value.size(),
            stride=value.stride(),
        )
    if isinstance(value, torch.Tensor):
        return _copy_into(value, cached)
    if isinstance(value, dict):
        prev = cached if isinstance(cached, dict) else {}
        return {k: _stage_value(v, prev.get(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        prev_seq = (
            cached if isinstance(cached, list | tuple) and len(cached) == len(value) else [None] * len(value)
        )
        staged = [_stage_value(v, c) for v, c in zip(value, prev_seq, strict=True)]
        return staged if isinstance(value, list) else tuple(staged)
    return copy.deepcopy(value)


def stage_state_dict(state_dict: dict[str, Any], previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """A deep host copy of a state dict (plain tensors, ShardedTensor, DTensor, plain data).

    Later in-place updates of the originals do not affect the copy. Tensors of
    ``previous`` (the last staged copy, no longer in use) are reused as buffers where shape
    and dtype match: a steady-state save then costs one memory copy and no allocation.
    """
    prev = previous or {}
    return {k: _stage_value(v, prev.get(k)) for k, v in state_dict.items()}


class AsyncSaver:
    """Runs one background save at a time and remembers its failure.

    It also owns what background saves reuse: the host copy of the state (one per part,
    refilled in place by :meth:`stage`) and the dedicated gloo group they communicate on.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.in_flight_step: int | None = None
        self._staged: dict[str, dict[str, Any]] = {}
        self._group: Any = None

    def stage(self, parts: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
        """Host copies of ``parts``, reusing the previous save's buffers (call after :meth:`wait`)."""
        staged = [(name, stage_state_dict(sd, self._staged.get(name))) for name, sd in parts]
        self._staged = dict(staged)
        return staged

    def group(self, active: bool) -> Any:
        """Collective at first use: the gloo group of background saves (never the training group)."""
        if not active:
            return None
        if self._group is None:
            import torch.distributed as torch_dist

            self._group = torch_dist.new_group(ranks=None, backend="gloo")
        return self._group

    def release(self) -> None:
        """Drop the host copy (after the last save)."""
        self._staged = {}

    def wait(self) -> None:
        """Block until the save in flight (if any) has finished; re-raise its failure."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self.in_flight_step = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def submit(self, step: int, job: Callable[[], None]) -> None:
        """Start ``job`` (which writes and commits a staged copy) in the background."""
        self.wait()

        def run() -> None:
            start = time.time()
            try:
                job()
            except BaseException as e:  # surfaced by the next wait(), never swallowed
                logger.error("async save of step %d failed: %s", step, e)
                self._error = e
            else:
                logger.info("async save of step %d finished in %.2fs", step, time.time() - start)

        self.in_flight_step = step
        self._thread = threading.Thread(target=run, name=f"reckpt-async-save-{step}", daemon=True)
        self._thread.start()
