"""The disk's ceiling, measured the way a storage engineer would: raw writes and cold raw reads.

A checkpoint library cannot move bytes faster than the disk takes them, so its throughput is
judged against the best the disk gives to the simplest possible program, in the same run:

- **write**: the process's bytes split into 1, 2, 4 or 8 parallel streams (one thread and
  one file each), written in three ways: buffered ``write`` of 16 MiB pieces; the same with
  early writeback (``sync_file_range(SYNC_FILE_RANGE_WRITE)`` after every piece, so the
  disk works while the rest is copied); and ``O_DIRECT`` (no page cache) of 4 MiB pieces,
  each copied into a page-aligned ``mmap`` buffer, as any ``O_DIRECT`` writer of tensors
  must, the last one padded to the block size, then the file truncated to its length. (A
  sweep of 2, 4 and 16 MiB ``O_DIRECT`` requests on the development VM: with 3-4 streams,
  2-4 MiB were 15-25% faster than 16 MiB; with one stream all three were alike.)
  Every variant ``fsync``\\ s every file before its clock stops. Where the file system refuses
  ``O_DIRECT`` (``EINVAL``) the variant is recorded as not supported.
- **read**: 1, 2, 4 or 8 threads, each reading one contiguous share of a file written by
  one stream, cold, in 16 MiB ``pread`` calls into a buffer of its own.

The ceiling is the fastest variant. Every variant is a figure of its own in the results, so
what the disk rewards (depth, early writeback, bypassing the cache) is visible.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "ALIGN",
    "DIRECT_PIECE",
    "MODES",
    "PIECE",
    "STREAMS",
    "DirectIOUnsupported",
    "best",
    "direct_io_support",
    "raw_read",
    "raw_write",
    "read_name",
    "split",
    "write_name",
]

STREAMS = (1, 2, 4, 8)
MODES = ("buffered", "early writeback", "O_DIRECT")
PIECE = 16 << 20  # buffered writes and reads
DIRECT_PIECE = 4 << 20  # O_DIRECT writes: the request size reckpt's own O_DIRECT writer uses
ALIGN = 4096  # O_DIRECT: buffer address, file offset and length in multiples of this


class DirectIOUnsupported(OSError):
    """The file system refuses ``O_DIRECT`` (``EINVAL`` on open or on an aligned write)."""


def write_name(streams: int, mode: str) -> str:
    """The figure's name: ``raw write (4 streams, early writeback)``."""
    label = f"{streams} stream{'s' if streams > 1 else ''}"
    return f"raw write ({label})" if mode == "buffered" else f"raw write ({label}, {mode})"


def read_name(streams: int) -> str:
    """The figure's name: ``raw read (4 streams)``."""
    return f"raw read ({streams} stream{'s' if streams > 1 else ''})"


def best(seconds: dict[str, float], prefix: str) -> str | None:
    """The fastest figure whose name starts with ``prefix`` (None when there is none)."""
    names = [k for k in seconds if k.startswith(prefix)]
    return min(names, key=lambda k: seconds[k]) if names else None


def split(blobs: Sequence[memoryview], streams: int) -> list[list[memoryview]]:
    """The bytes of ``blobs``, in order, cut into ``streams`` runs of nearly equal length.

    Cuts fall on multiples of :data:`ALIGN`, so every run but the last is aligned for
    ``O_DIRECT``; a run may be empty when there are fewer bytes than streams.
    """
    total = sum(len(b) for b in blobs)
    share = -(-total // streams // ALIGN) * ALIGN if total else 0
    runs: list[list[memoryview]] = [[] for _ in range(streams)]
    room, i = share, 0
    for blob in blobs:
        pos = 0
        while pos < len(blob):
            if room == 0 and i < streams - 1:
                i, room = i + 1, share
            n = len(blob) - pos if i == streams - 1 else min(room, len(blob) - pos)
            runs[i].append(blob[pos : pos + n])
            pos += n
            room -= n
    return runs


def direct_io_support(directory: str) -> str | None:
    """``None`` when ``directory``'s file system takes ``O_DIRECT`` writes, else the reason."""
    if not hasattr(os, "O_DIRECT"):
        return "not supported: no O_DIRECT on this platform"
    fd, path = tempfile.mkstemp(dir=directory, prefix=".odirect-probe-")
    os.close(fd)
    try:
        _write_file(path, [memoryview(bytes(ALIGN))], "O_DIRECT")
    except DirectIOUnsupported as e:
        return f"not supported: {e}"
    finally:
        os.unlink(path)
    return None


def _write_all(fd: int, view: memoryview) -> None:
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])


def _address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def _write_direct(fd: int, views: Sequence[memoryview]) -> None:
    """Through one page-aligned buffer: copy a piece in, write it, until every view is out."""
    buf = mmap.mmap(-1, DIRECT_PIECE)
    out = memoryview(buf)
    base = _address(out)
    fill = total = 0
    try:
        for view in views:
            src = memoryview(view).cast("B")
            pos = 0
            while pos < len(src):
                n = min(DIRECT_PIECE - fill, len(src) - pos)
                if src.readonly:
                    out[fill : fill + n] = src[pos : pos + n]
                else:  # ctypes releases the GIL: the streams copy in parallel
                    ctypes.memmove(base + fill, _address(src[pos : pos + n]), n)
                fill, pos = fill + n, pos + n
                if fill == DIRECT_PIECE:
                    _write_all(fd, out)
                    total, fill = total + fill, 0
        if fill:
            padded = -(-fill // ALIGN) * ALIGN
            ctypes.memset(base + fill, 0, padded - fill)
            _write_all(fd, out[:padded])
            os.ftruncate(fd, total + fill)
    finally:
        out.release()
        buf.close()


def _write_file(path: str, views: Sequence[memoryview], mode: str) -> None:
    from reckpt.storage.writeback import start_writeback

    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if mode == "O_DIRECT":
        flags |= os.O_DIRECT
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.EINVAL:
            raise DirectIOUnsupported(e.errno, f"open(O_DIRECT) refused: {e.strerror}") from e
        raise
    try:
        if mode == "O_DIRECT":
            try:
                _write_direct(fd, views)
            except OSError as e:
                if e.errno == errno.EINVAL:
                    raise DirectIOUnsupported(e.errno, f"aligned O_DIRECT write refused: {e.strerror}") from e
                raise
        else:
            offset = 0
            for view in views:
                for start in range(0, len(view), PIECE):
                    piece = view[start : start + PIECE]
                    _write_all(fd, piece)
                    if mode == "early writeback":
                        start_writeback(fd, offset, len(piece))
                    offset += len(piece)
        os.fsync(fd)
    finally:
        os.close(fd)


def _parallel(jobs: Sequence[Callable[[], None]]) -> None:
    """Run the jobs on threads of their own; re-raise the first failure."""
    errors: list[BaseException] = []

    def run(job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def raw_write(paths: Sequence[str], runs: Sequence[Sequence[memoryview]], mode: str) -> None:
    """Write ``runs[i]`` to ``paths[i]``, all at once (one thread each), every file fsync'd.

    Raises:
        DirectIOUnsupported: ``mode`` is ``O_DIRECT`` and the file system refuses it.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    _parallel([lambda p=p, r=r: _write_file(p, r, mode) for p, r in zip(paths, runs, strict=True)])


def raw_read(path: str, streams: int) -> int:
    """Read all of ``path`` with ``streams`` threads, each a contiguous share; the bytes read."""
    size = os.path.getsize(path)
    share = -(-size // streams)
    got: list[int] = []

    def read(start: int, end: int) -> None:
        buf = memoryview(bytearray(PIECE))
        fd = os.open(path, os.O_RDONLY)
        n = 0
        try:
            pos = start
            while pos < end:
                k = os.preadv(fd, [buf[: min(PIECE, end - pos)]], pos)
                if k <= 0:
                    break
                pos += k
                n += k
        finally:
            os.close(fd)
        got.append(n)

    _parallel([lambda s=s: read(s, min(size, s + share)) for s in range(0, max(size, 1), share or 1)])
    return sum(got)


def describe() -> dict[str, Any]:
    """The method, for the results' JSON."""
    return {
        "write": "1/2/4/8 streams per process (thread + file each): buffered 16 MiB pieces,"
        " the same + sync_file_range after each piece, O_DIRECT 4 MiB pieces from an aligned"
        " mmap buffer; every file fsync'd",
        "read": "1/2/4/8 threads per process over contiguous shares of a file written by one"
        " stream, cold, 16 MiB preadv into a buffer per thread",
        "ceiling": "the fastest variant (median seconds); a ratio above 1.0 against it is a"
        " measurement error",
    }
