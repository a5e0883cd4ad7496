"""The host copy of ``"copy"`` async saves: one arena of buffers, reused from save to save.

An async save freezes the state into host memory and returns; the background writer then
reads that copy while the training goes on. :class:`HostArena` owns the copy between saves:

- **Reused.** Each save refills the previous save's buffers in place
  (:func:`reckpt.save.host_copy.stage_state_dict`), in parallel spans at memory speed: a
  steady-state save allocates nothing and takes no page faults. The arena holds one copy
  of the state (:attr:`HostArena.nbytes`).
- **Never overwritten while it is read.** :meth:`HostArena.fill` must not run while a save
  still writes from the arena; :class:`reckpt.save.async_saver.AsyncSaver` waits for the
  save in flight before it refills.
- **Shapes may change.** A tensor whose shape or dtype changed (a table that grew) gets a
  new buffer; its old buffer goes with the previous copy.
- **CUDA tensors** get pinned buffers, filled on a side stream without blocking the caller
  (:mod:`reckpt.save.device_copy`); :meth:`HostArena.ready` waits for those copies, and the
  writer calls it before reading.
- **Released** by :meth:`HostArena.release` (the manager's ``close()``): the buffers are
  dropped and pinned memory the arena used goes back to the driver.
"""

from __future__ import annotations

from typing import Any

import torch

from reckpt.save.device_copy import DeviceBackend, Pending, default_backend
from reckpt.save.host_copy import stage_state_dict

__all__ = ["HostArena"]


class HostArena:
    """The reusable host copy of the parts an async save writes.

    Args:
        backend: the device operations for CUDA tensors (default: CUDA's, on first use).
    """

    def __init__(self, backend: DeviceBackend | None = None) -> None:
        self._parts: dict[str, dict[str, Any]] = {}
        self._pending: list[Pending] = []
        self._backend = backend
        self._pinned = False

    def fill(self, parts: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
        """Copy ``parts`` into the arena, reusing the previous fill's buffers where they fit.

        Call only once no save reads the previous fill. Returns the copy, in the order of
        ``parts``; device copies may still be landing: :meth:`ready` before reading it.
        """
        self.ready()  # an earlier fill that was never written: its copies land before reuse
        staged = [
            (name, stage_state_dict(sd, self._parts.get(name), pending=self._pending, backend=self._backend))
            for name, sd in parts
        ]
        self._parts = dict(staged)
        self._pinned = self._pinned or bool(self._pending)
        return staged

    def ready(self) -> None:
        """Block until the last fill's device copies have landed (no-op for host state)."""
        pending, self._pending = self._pending, []
        for p in pending:
            p.wait()

    @property
    def parts(self) -> dict[str, dict[str, Any]]:
        """The last fill, by part name (its tensors are the arena's buffers)."""
        return self._parts

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data the arena holds."""
        return sum(_tensor_bytes(sd) for sd in self._parts.values())

    def release(self) -> None:
        """Drop the buffers (after the last save); pinned ones go back to the driver."""
        try:
            self.ready()
        finally:
            self._parts = {}
            if self._pinned:
                self._pinned = False
                (self._backend or default_backend()).release_cached_pinned()


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(v) for v in value)
    if callable(getattr(value, "local_shards", None)):
        return sum(int(s.tensor.nbytes) for s in value.local_shards())
    if callable(getattr(value, "to_local", None)):
        return int(value.to_local().nbytes)
    if isinstance(value, torch.Tensor):
        return int(value.nbytes)
    return 0
