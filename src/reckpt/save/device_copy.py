"""CUDA tensors to and from pinned, reused host buffers, copied on a side stream.

A copy from device memory into pageable host memory is synchronous and runs at a fraction
of the bus speed (the driver bounces it through a pinned buffer of its own). Page-locked
("pinned") host buffers take the DMA engine directly, and a copy issued with
``non_blocking=True`` on a stream of its own returns at once. So:

- **Saving** (:class:`DeviceCopies`, used by :mod:`reckpt.save.host_copy` for CUDA tensors
  only): the side stream of each device first waits for the work already queued on the
  caller's current stream (the step that produced the weights); the copies into pinned
  buffers are queued on the side stream; an event is recorded after them, and the current
  stream is made to wait on that event, so training kernels queued later cannot change a
  tensor before it was copied. The caller's thread is not blocked; :meth:`Pending.wait` (the
  background writer, before it reads the buffers) waits on the event. Pinned buffers are
  reused from one save to the next.
- **Restoring** (:class:`PinnedLoader`): bytes are read into one of two reused pinned
  buffers while the other one is uploaded to the device, ``non_blocking``, on the side
  stream; :meth:`PinnedLoader.finish` makes the current stream wait for the uploads.

Every entry point takes the backend (:class:`DeviceBackend`, default :class:`CudaBackend`)
as an argument, so the stream and event logic runs in tests on a machine without a GPU.
Host and other tensors never reach this module: :func:`uses_device_path` selects it for
CUDA tensors only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Protocol, cast

import torch

__all__ = ["CudaBackend", "DeviceBackend", "DeviceCopies", "Pending", "PinnedLoader", "uses_device_path"]

_cuda: Any = torch.cuda  # its constructors are untyped

CHUNK_BYTES = 64 << 20
"""Size of each of :class:`PinnedLoader`'s two pinned buffers."""


def uses_device_path(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is copied through pinned buffers on a side stream: CUDA tensors only."""
    return tensor.device.type == "cuda"


class DeviceBackend(Protocol):
    """The stream, event and pinned-memory operations this module needs (CUDA's, or a fake)."""

    def current_stream(self, device: torch.device) -> Any: ...

    def side_stream(self, device: torch.device) -> Any: ...

    def new_event(self) -> Any: ...

    def use(self, stream: Any) -> contextlib.AbstractContextManager[Any]: ...

    def pinned_empty(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor: ...

    def is_pinned(self, tensor: torch.Tensor) -> bool: ...

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None: ...

    def release_cached_pinned(self) -> None: ...


class CudaBackend:
    """:class:`DeviceBackend` on ``torch.cuda``: one side stream per device, kept for reuse."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, Any] = {}

    def current_stream(self, device: torch.device) -> Any:
        return torch.cuda.current_stream(device)

    def side_stream(self, device: torch.device) -> Any:
        if device not in self._streams:
            self._streams[device] = _cuda.Stream(device)
        return self._streams[device]

    def new_event(self) -> Any:
        return _cuda.Event()

    def use(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.stream(stream)

    def pinned_empty(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return bool(tensor.is_pinned())

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        tensor.record_stream(stream)

    def release_cached_pinned(self) -> None:
        """Return the pinned blocks PyTorch's host allocator keeps for reuse (unused ones only)."""
        if not _cuda.is_initialized():
            return
        accelerator: Any = getattr(torch, "accelerator", None)
        empty = getattr(accelerator, "empty_host_cache", None) or getattr(torch._C, "_host_emptyCache", None)
        if empty is not None:
            empty()


_default: CudaBackend | None = None


def default_backend() -> CudaBackend:
    """The process's :class:`CudaBackend` (created on first use; its side streams are reused)."""
    global _default
    if _default is None:
        _default = CudaBackend()
    return _default


class Pending:
    """Device-to-host copies in flight: :meth:`wait` before reading their host buffers."""

    def __init__(self, events: list[Any], sources: list[torch.Tensor]) -> None:
        self._events = events
        self._sources = sources  # alive until the copies are done

    def wait(self) -> None:
        """Block until every copy has landed in its host buffer (idempotent)."""
        for event in self._events:
            event.synchronize()
        self._events, self._sources = [], []


class DeviceCopies:
    """The device-to-host copies of one staging pass, issued together by :meth:`run`.

    Args:
        backend: the device operations (default: CUDA's).
    """

    def __init__(self, backend: DeviceBackend | None = None) -> None:
        self.backend: DeviceBackend = backend if backend is not None else default_backend()
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (pinned host dst, device src)

    def into(self, src: torch.Tensor, cached: Any) -> torch.Tensor:
        """The pinned host buffer ``src`` will be copied into: ``cached`` when it fits, else a new one."""
        fits = (
            type(cached) is torch.Tensor
            and cached.shape == src.shape
            and cached.dtype == src.dtype
            and cached.device.type == "cpu"
            and cached.is_contiguous()
            and self.backend.is_pinned(cached)
        )
        dst = cached if fits else self.backend.pinned_empty(src.shape, src.dtype)
        self.pairs.append((dst, src))
        return dst

    def run(self) -> Pending:
        """Queue every copy on its device's side stream; the current streams wait for them."""
        by_device: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for dst, src in self.pairs:
            by_device.setdefault(src.device, []).append((dst, src))
        events: list[Any] = []
        for device, pairs in by_device.items():
            current = self.backend.current_stream(device)
            side = self.backend.side_stream(device)
            side.wait_stream(current)  # the copies see the state the caller's queued work leaves
            with self.backend.use(side):
                for dst, src in pairs:
                    dst.copy_(src, non_blocking=True)
                    self.backend.record_stream(src, side)  # its memory is not reused before the copy ran
                event = self.backend.new_event()
                event.record(side)
            current.wait_event(event)  # later training work cannot overwrite a tensor not yet copied
            events.append(event)
        sources = [src for _, src in self.pairs]
        self.pairs = []
        return Pending(events, sources)


class PinnedLoader:
    """Fills tensors from a byte source; CUDA ones through two reused pinned buffers.

    Reading chunk ``i + 1`` into one buffer overlaps the upload of chunk ``i`` from the other
    (``non_blocking`` on the side stream); a buffer is refilled only after its upload's event.
    A host tensor is read straight into its own bytes. Call :meth:`finish` once the tensors are
    loaded, before the caller uses them on the device, and :meth:`close` to free the buffers.

    Args:
        chunk_bytes: size of each pinned buffer.
        backend: the device operations (default: CUDA's).
    """

    def __init__(self, chunk_bytes: int = CHUNK_BYTES, backend: DeviceBackend | None = None) -> None:
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive; got {chunk_bytes}")
        self.chunk_bytes = chunk_bytes
        self._backend = backend
        self._buffers: list[torch.Tensor] = []
        self._events: list[Any] = [None, None]
        self._next = 0
        self._devices: set[torch.device] = set()

    @property
    def backend(self) -> DeviceBackend:
        if self._backend is None:
            self._backend = default_backend()
        return self._backend

    def load(self, target: torch.Tensor, read_into: Callable[[memoryview], int]) -> int:
        """Fill contiguous ``target`` by ``read_into(view)`` calls; the number of bytes read.

        ``read_into`` fills a writable byte view and returns how many bytes it wrote (fewer:
        the source ended). Fewer bytes than ``target`` holds are returned as they are: the
        caller decides whether that is an error.

        Raises:
            ValueError: ``target`` is not contiguous.
        """
        if not target.is_contiguous():
            raise ValueError("PinnedLoader.load needs a contiguous target tensor")
        flat = target.detach().reshape(-1).view(torch.uint8)
        if not uses_device_path(target):
            return read_into(memoryview(cast(Any, flat.numpy())).cast("B"))
        backend = self.backend
        side = backend.side_stream(target.device)
        if target.device not in self._devices:
            side.wait_stream(backend.current_stream(target.device))  # earlier work on target is done
            self._devices.add(target.device)
        backend.record_stream(target, side)  # its memory is not reused before the uploads ran
        done = 0
        total = flat.numel()
        while done < total:
            buf = self._buffer()
            size = min(total - done, buf.numel())
            got = read_into(memoryview(cast(Any, buf.numpy())).cast("B")[:size])
            if got > 0:
                with backend.use(side):
                    flat[done : done + got].copy_(buf[:got], non_blocking=True)
                    event = backend.new_event()
                    event.record(side)
                self._events[self._next] = event
                self._next = 1 - self._next
            done += max(got, 0)
            if got < size:
                break
        return done

    def _buffer(self) -> torch.Tensor:
        """The next pinned buffer, once its previous upload has finished."""
        if not self._buffers:
            self._buffers = [
                self.backend.pinned_empty(torch.Size([self.chunk_bytes]), torch.uint8) for _ in range(2)
            ]
        event = self._events[self._next]
        if event is not None:
            event.synchronize()
            self._events[self._next] = None
        return self._buffers[self._next]

    def finish(self) -> None:
        """Make every device's current stream wait for the uploads queued so far."""
        for device in self._devices:
            side = self.backend.side_stream(device)
            event = self.backend.new_event()
            event.record(side)
            self.backend.current_stream(device).wait_event(event)
        self._devices = set()

    def close(self) -> None:
        """Wait for the uploads, then drop the pinned buffers (idempotent)."""
        for event in self._events:
            if event is not None:
                event.synchronize()
        self._events = [None, None]
        self._buffers = []
