"""Asynchronous save: freeze a consistent snapshot, write and commit in the background.

The caller is blocked only while (a) the previous save in flight finishes (at most one
snapshot exists) and (b) the state is frozen, in one of two ways (``async_snapshot``):

- ``"copy"`` (the default): a host copy of every tensor in an arena refilled in place at each
  save (:mod:`reckpt.save.arena`): one parallel memory copy of the state; CUDA tensors go to
  pinned buffers on a side stream and do not block the caller (:mod:`reckpt.save.device_copy`).
- ``"fork"``: a copy-on-write image in a forked process (:mod:`reckpt.save.fork_snapshot`). The
  stall is the ``fork`` alone (page tables, not data), but the training then pays a page
  fault for every 4 KiB page it writes after the fork, and a page copy as well while the
  child still writes. That is cheaper than the copy only when training rewrites a small
  share of the state between two saves (large tables, sparse updates); the benchmark
  ``async_stall`` measures both. Host-memory state and a store both processes see.

Writing, checksums and the commit then run on a background thread whose collectives use a
dedicated gloo process group, never the training group. A failure in the background is
re-raised by the next call (:meth:`AsyncSaver.wait`, the next save, or the manager's
``close()``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from reckpt.errors import ConfigError
from reckpt.save.arena import HostArena
from reckpt.save.fork_snapshot import ForkSnapshot, fork_supported, visible_to_child
from reckpt.storage.core import Storage

__all__ = ["AsyncSaver", "SNAPSHOT_MODES"]

SNAPSHOT_MODES = ("copy", "fork")

logger = logging.getLogger(__name__)


class AsyncSaver:
    """Runs one background save at a time and remembers its failure.

    It also owns what background saves reuse: the host copy of the state (an arena
    refilled in place by :meth:`stage`) and the dedicated gloo group they communicate on.

    Args:
        snapshot: how :meth:`freeze` freezes the state: ``"copy"`` or ``"fork"``.

    Raises:
        ConfigError: ``snapshot`` is not one of these, or ``"fork"`` where there is no fork.
    """

    def __init__(self, snapshot: str = "copy") -> None:
        if snapshot not in SNAPSHOT_MODES:
            raise ConfigError(f"async_snapshot must be one of {', '.join(SNAPSHOT_MODES)}; got {snapshot!r}")
        if snapshot == "fork" and not fork_supported():
            raise ConfigError('async_snapshot="fork" needs os.fork (POSIX); use "copy" on this platform')
        self.snapshot_mode = snapshot
        self._fork: ForkSnapshot | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.in_flight_step: int | None = None
        self.arena = HostArena()
        self._group: Any = None

    def freeze(
        self, parts: list[tuple[str, dict[str, Any]]], is_coordinator: bool, storage: Storage
    ) -> tuple[list[tuple[str, dict[str, Any]]], ForkSnapshot | None]:
        """What the next :meth:`submit` saves: ``(parts, their fork snapshot)`` or ``(host copy, None)``.

        Local to the rank (no collective); call after :meth:`wait`. A fork snapshot is
        closed when the submitted job ends.

        Raises:
            ConfigError: ``"fork"`` on a process-local store (``memory://``) or with tensors on
                an accelerator.
        """
        if self.snapshot_mode == "fork":
            if not visible_to_child(storage):
                raise ConfigError(
                    'async_snapshot="fork" cannot write to memory:// (the store lives in this'
                    ' process); use async_snapshot="copy"'
                )
            self._drop_fork()
            self._fork = ForkSnapshot(parts, is_coordinator)
            return self._fork.parts, self._fork
        return self.stage(parts), None

    def stage(self, parts: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
        """Host copies of ``parts`` in the arena, reusing the previous save's buffers.

        A save still writing from the arena is waited for first (its failure is raised), so
        a copy is never overwritten while it is read.
        """
        if self._thread is not None:
            self.wait()
        return self.arena.fill(parts)

    @property
    def _staged(self) -> dict[str, dict[str, Any]]:
        """The arena's current copy, by part (the name under which callers inspect it)."""
        return self.arena.parts

    def group(self, active: bool) -> Any:
        """Collective at first use: the gloo group of background saves (never the training group)."""
        if not active:
            return None
        if self._group is None:
            import torch.distributed as torch_dist

            self._group = torch_dist.new_group(ranks=None, backend="gloo")
        return self._group

    def release(self) -> None:
        """Drop the host copy and a fork snapshot never submitted (after the last save)."""
        try:
            self.arena.release()
        finally:
            self._drop_fork()

    def _drop_fork(self) -> None:
        if self._fork is not None:
            fork, self._fork = self._fork, None
            fork.close()

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
        """Start ``job`` (which writes and commits a staged copy) in the background.

        The job first waits for the arena's device copies (if any) to land.
        """
        fork, self._fork = self._fork, None
        try:
            self.wait()
        except BaseException:
            if fork is not None:
                fork.close()
            raise

        def run() -> None:
            start = time.time()
            try:
                try:
                    self.arena.ready()
                    job()
                finally:
                    if fork is not None:
                        fork.close()
            except BaseException as e:  # surfaced by the next wait(), never swallowed
                logger.error("async save of step %d failed: %s", step, e)
                self._error = e
            else:
                logger.info("async save of step %d finished in %.2fs", step, time.time() - start)

        try:
            thread = threading.Thread(target=run, name=f"reckpt-async-save-{step}", daemon=True)
            thread.start()
        except BaseException:
            if fork is not None:
                fork.close()
            raise
        self.in_flight_step = step
        self._thread = thread
