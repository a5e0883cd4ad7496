"""The async host-copy arena: exact, reused, safe against a save still reading it, released on close."""

from __future__ import annotations

import gc
import mmap
import os
import threading
import weakref

import pytest
import torch

from reckpt.save.arena import HostArena
from reckpt.save.async_saver import AsyncSaver


def _parts(sd: dict[str, torch.Tensor]) -> list[tuple[str, dict[str, object]]]:
    return [("model", {"tables": sd, "lr": 0.1}), ("optimizer", {"state": {"m": sd["a"] * 0}})]


def test_fill_copies_exactly_and_reuses_buffers() -> None:
    sd = {"a": torch.randn(1000, 16), "b": torch.arange(10)}
    arena = HostArena()
    first = arena.fill(_parts(sd))
    assert arena.nbytes == 1000 * 16 * 4 + 10 * 8 + 1000 * 16 * 4
    buf = first[0][1]["tables"]["a"]  # type: ignore[index]
    sd["a"].add_(1.0)
    assert not torch.equal(buf, sd["a"])  # independent of the source
    second = arena.fill(_parts(sd))
    assert second[0][1]["tables"]["a"] is buf and torch.equal(buf, sd["a"])  # type: ignore[index]
    assert second[0][1]["lr"] == 0.1 and [name for name, _ in second] == ["model", "optimizer"]


def test_growing_tables_get_new_buffers() -> None:
    sd = {"a": torch.randn(100, 8), "b": torch.randn(7)}
    arena = HostArena()
    old = arena.fill([("model", sd)])[0][1]
    grown = {"a": torch.cat([sd["a"], torch.randn(50, 8)]), "b": sd["b"]}
    new = arena.fill([("model", grown)])[0][1]
    assert new["a"] is not old["a"] and new["a"].shape == (150, 8) and torch.equal(new["a"], grown["a"])
    assert new["b"] is old["b"] and torch.equal(new["b"], sd["b"])
    shrunk = {"a": grown["a"][:10].clone(), "b": sd["b"].double()}
    again = arena.fill([("model", shrunk)])[0][1]
    assert torch.equal(again["a"], shrunk["a"]) and again["b"].dtype == torch.float64
    assert arena.nbytes == 10 * 8 * 4 + 7 * 8


def test_release_frees_the_buffers() -> None:
    arena = HostArena()
    staged = arena.fill([("model", {"w": torch.randn(256, 256)})])
    ref = weakref.ref(staged[0][1]["w"])
    del staged
    arena.release()
    gc.collect()
    assert ref() is None and arena.nbytes == 0 and arena.parts == {}


def test_refill_waits_for_the_save_still_reading_the_arena() -> None:
    """A save writing from the arena is never overwritten: the next stage waits for it."""
    saver = AsyncSaver("copy")
    w = torch.zeros(1000)
    staged = saver.stage([("model", {"w": w})])
    reading = threading.Event()
    proceed = threading.Event()
    seen: list[float] = []

    def job() -> None:
        reading.set()
        proceed.wait(30)
        seen.append(float(staged[0][1]["w"].sum()))  # type: ignore[attr-defined]

    saver.submit(1, job)
    assert reading.wait(30)
    w.fill_(1.0)
    restaged: list[object] = []
    refill = threading.Thread(target=lambda: restaged.append(saver.stage([("model", {"w": w})])))
    refill.start()
    refill.join(0.2)
    assert refill.is_alive() and not restaged  # held back while the save reads
    proceed.set()
    refill.join(30)
    assert seen == [0.0] and restaged  # the save wrote its own copy; the refill came after
    saver.wait()
    saver.release()


def test_a_failed_save_surfaces_at_the_next_stage() -> None:
    saver = AsyncSaver("copy")
    saver.stage([("model", {"w": torch.zeros(4)})])

    def job() -> None:
        raise OSError("disk full")

    saver.submit(1, job)
    with pytest.raises(OSError, match="disk full"):
        saver.stage([("model", {"w": torch.zeros(4)})])
    saver.release()


def _mapped(address: int) -> bool:
    with open("/proc/self/maps") as f:
        for line in f:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            if start <= address < end:
                return True
    return False


@pytest.mark.skipif(not hasattr(mmap, "MADV_DONTFORK"), reason="MADV_DONTFORK is Linux-only")
def test_large_buffers_are_not_inherited_by_forks_and_are_unmapped_on_release() -> None:
    """A fork (a DataLoader worker) must not make the copy copy-on-write; release unmaps it."""
    arena = HostArena()
    w = torch.randn(1 << 19)  # 2 MiB: a mapping of its own
    buf = arena.fill([("model", {"w": w, "small": torch.ones(3)})])[0][1]["w"]
    address = buf.data_ptr()
    assert torch.equal(buf, w) and _mapped(address)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: is the copy's address mapped here?
        os.write(write, b"1" if _mapped(address) else b"0")
        os._exit(0)
    os.close(write)
    inherited = os.read(read, 1)
    os.close(read)
    os.waitpid(pid, 0)
    assert inherited == b"0"
    w.add_(1.0)
    again = arena.fill([("model", {"w": w, "small": torch.ones(3)})])[0][1]["w"]
    assert again is buf and torch.equal(again, w)  # still the parent's, refilled in place
    del buf, again
    arena.release()
    gc.collect()
    assert not _mapped(address)
