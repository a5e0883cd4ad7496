"""The CUDA save/restore path's logic, run on host tensors through a recording fake backend.

No GPU is needed: :class:`FakeBackend` stands in for ``torch.cuda`` (streams, events, pinned
allocation) and records every call, so the tests check what is issued where and in which
order; host tensors stand in for device ones where a test says they are on the device.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import reckpt.save.device_copy as device_copy
import reckpt.save.host_copy as host_copy
from reckpt.save.arena import HostArena
from reckpt.save.async_saver import AsyncSaver
from reckpt.save.device_copy import DeviceCopies, PinnedLoader, uses_device_path
from reckpt.save.host_copy import stage_state_dict


class FakeEvent:
    def __init__(self, log: list[tuple[Any, ...]]) -> None:
        self.log = log
        self.recorded_on: Any = None
        self.synchronized = False

    def record(self, stream: Any) -> None:
        self.recorded_on = stream
        self.log.append(("record", stream.name, self))

    def synchronize(self) -> None:
        self.synchronized = True
        self.log.append(("synchronize", self))


class FakeStream:
    def __init__(self, name: str, log: list[tuple[Any, ...]]) -> None:
        self.name = name
        self.log = log

    def wait_stream(self, other: FakeStream) -> None:
        self.log.append(("wait_stream", self.name, other.name))

    def wait_event(self, event: FakeEvent) -> None:
        self.log.append(("wait_event", self.name, event))


class FakeBackend:
    """Records stream, event and allocation calls; 'pinned' buffers are host tensors it made."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.current = FakeStream("current", self.log)
        self.side = FakeStream("side", self.log)
        self.active: str | None = None
        self.pinned: list[torch.Tensor] = []
        self.released = 0

    def current_stream(self, device: torch.device) -> FakeStream:
        return self.current

    def side_stream(self, device: torch.device) -> FakeStream:
        return self.side

    def new_event(self) -> FakeEvent:
        return FakeEvent(self.log)

    @contextlib.contextmanager
    def use(self, stream: FakeStream) -> Iterator[None]:
        self.active = stream.name
        self.log.append(("enter", stream.name))
        try:
            yield
        finally:
            self.active = None

    def pinned_empty(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype)
        self.pinned.append(t)
        self.log.append(("pinned_empty", tuple(shape)))
        return t

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return any(tensor is t for t in self.pinned)

    def record_stream(self, tensor: torch.Tensor, stream: FakeStream) -> None:
        self.log.append(("record_stream", stream.name))

    def release_cached_pinned(self) -> None:
        self.released += 1


class Untouchable:
    """A backend that fails on any use: host state must never reach the device path."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the device backend was used ({name}) for host tensors")


@pytest.fixture
def on_device(monkeypatch: pytest.MonkeyPatch) -> set[int]:
    """Tensors whose data pointers are added here count as CUDA tensors on the save and load paths."""
    ids: set[int] = set()

    def fake(t: torch.Tensor) -> bool:
        return t.data_ptr() in ids or uses_device_path(t)

    monkeypatch.setattr(host_copy, "uses_device_path", fake)
    monkeypatch.setattr(device_copy, "uses_device_path", fake)
    return ids


def test_device_path_is_selected_for_cuda_tensors_only() -> None:
    assert not uses_device_path(torch.ones(2))
    assert not uses_device_path(torch.empty(2, device="meta"))
    for device in ("cuda", "cuda:0", "cuda:3"):
        assert uses_device_path(SimpleNamespace(device=torch.device(device)))  # type: ignore[arg-type]
    assert not uses_device_path(SimpleNamespace(device=torch.device("xpu")))  # type: ignore[arg-type]


def test_host_state_never_touches_the_device_backend() -> None:
    sd = {"w": torch.randn(100, 4), "nested": {"b": [torch.ones(3)]}, "lr": 0.1}
    pending: list[Any] = []
    staged = stage_state_dict(sd, backend=Untouchable(), pending=pending)  # type: ignore[arg-type]
    assert pending == [] and torch.equal(staged["w"], sd["w"]) and staged["w"] is not sd["w"]
    loaded = torch.empty(10, dtype=torch.uint8)
    loader = PinnedLoader(chunk_bytes=4, backend=Untouchable())  # type: ignore[arg-type]
    assert loader.load(loaded, io.BytesIO(bytes(range(10))).readinto) == 10  # straight in, one read
    assert loaded.tolist() == list(range(10))


def test_device_tensors_go_through_pinned_buffers_on_the_side_stream(on_device: set[int]) -> None:
    fake = FakeBackend()
    gpu = torch.randn(64, 8)
    on_device.add(gpu.data_ptr())
    sd = {"gpu": gpu, "cpu": torch.randn(5)}
    pending: list[Any] = []
    staged = stage_state_dict(sd, pending=pending, backend=fake)  # type: ignore[arg-type]
    assert len(pending) == 1 and staged["gpu"] is fake.pinned[0]  # only the device tensor is pinned
    kinds = [entry[0] for entry in fake.log]
    # the side stream waits for queued work, copies, records; the current stream waits on it
    assert kinds == ["pinned_empty", "wait_stream", "enter", "record_stream", "record", "wait_event"]
    assert fake.log[1] == ("wait_stream", "side", "current")
    event = fake.log[4][2]
    assert fake.log[4][1] == "side" and fake.log[5] == ("wait_event", "current", event)
    assert not event.synchronized  # the caller is not blocked
    pending[0].wait()
    assert event.synchronized and torch.equal(staged["gpu"], gpu) and torch.equal(staged["cpu"], sd["cpu"])


def test_without_pending_the_copy_has_landed_on_return(on_device: set[int]) -> None:
    fake = FakeBackend()
    gpu = torch.randn(16)
    on_device.add(gpu.data_ptr())
    staged = stage_state_dict({"gpu": gpu}, backend=fake)  # type: ignore[arg-type]
    assert fake.log[-1][0] == "synchronize" and torch.equal(staged["gpu"], gpu)


def test_pinned_buffers_are_reused_while_they_fit(on_device: set[int]) -> None:
    fake = FakeBackend()
    copies = DeviceCopies(fake)  # type: ignore[arg-type]
    src = torch.randn(4, 4)
    first = copies.into(src, None)
    copies.run().wait()
    assert copies.into(src, first) is first  # same shape and dtype: reused
    assert copies.into(torch.randn(5, 4), first) is not first  # grown: a new pinned buffer
    assert copies.into(src, torch.empty(4, 4)) is not fake.pinned[0]  # pageable: never reused
    copies.run().wait()
    assert len(fake.pinned) == 3


def test_arena_waits_for_device_copies_before_the_writer_reads(on_device: set[int]) -> None:
    fake = FakeBackend()
    saver = AsyncSaver("copy")
    saver.arena = HostArena(backend=fake)  # type: ignore[arg-type]
    gpu = torch.randn(32)
    on_device.add(gpu.data_ptr())
    staged = saver.stage([("model", {"gpu": gpu})])
    event = next(e[2] for e in fake.log if e[0] == "record")
    seen: list[bool] = []
    saver.submit(1, lambda: seen.append(event.synchronized))
    saver.wait()
    assert seen == [True] and torch.equal(staged[0][1]["gpu"], gpu)
    saver.release()
    assert fake.released == 1 and saver.arena.nbytes == 0


def test_pinned_loader_streams_chunks_through_two_buffers(on_device: set[int]) -> None:
    fake = FakeBackend()
    data = torch.randint(0, 255, (10_000,), dtype=torch.uint8)
    target = torch.zeros(2500, dtype=torch.float32)  # 10 000 bytes, "on the device"
    on_device.add(target.data_ptr())
    source = io.BytesIO(data.numpy().tobytes())
    loader = PinnedLoader(chunk_bytes=1024, backend=fake)  # type: ignore[arg-type]
    assert loader.load(target, source.readinto) == 10_000
    assert torch.equal(target.view(torch.uint8), data)
    assert len(fake.pinned) == 2  # two buffers for ten chunks
    records = [e for e in fake.log if e[0] == "record"]
    assert len(records) == 10 and all(r[1] == "side" for r in records)
    # a buffer is refilled only after the upload from it has finished
    for i, rec in enumerate(records[:-2]):
        assert rec[2].synchronized, i
    loader.finish()
    assert fake.log[-1][0] == "wait_event" and fake.log[-1][1] == "current"
    loader.close()
    assert all(r[2].synchronized for r in records)


def test_pinned_loader_reports_a_short_source(on_device: set[int]) -> None:
    fake = FakeBackend()
    target = torch.zeros(100, dtype=torch.uint8)
    on_device.add(target.data_ptr())
    loader = PinnedLoader(chunk_bytes=16, backend=fake)  # type: ignore[arg-type]
    assert loader.load(target, io.BytesIO(b"x" * 40).readinto) == 40
    assert target[:40].eq(ord("x")).all() and target[40:].eq(0).all()
    with pytest.raises(ValueError, match="contiguous"):
        loader.load(torch.zeros(4, 4).t(), io.BytesIO().readinto)
    with pytest.raises(ValueError, match="positive"):
        PinnedLoader(chunk_bytes=0)
