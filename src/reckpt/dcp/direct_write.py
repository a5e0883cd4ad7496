"""Data files written with ``O_DIRECT``: from the save straight to the disk, past the page cache.

A buffered write only copies the bytes into the page cache; the kernel writes them back
later, and a save's final ``fsync`` waits for all of it. On the development VM that
write-back is what limits a save: buffered writes of 1 GB took 1.7-5 s whatever the number
of streams or early writeback, the same bytes written with ``O_DIRECT`` took 0.5-1.0 s, run
after run (``benchmarks/ceiling.py``). A checkpoint is written once and not read back
soon, so caching it gains nothing and evicts the training's own pages.

``O_DIRECT`` needs the memory, the file offset and the length of every write aligned to the
device's block size. :class:`DirectWriter` therefore copies what it is given into one
page-aligned buffer of :data:`DIRECT_PIECE` bytes (the copy releases the GIL, like the
kernel's copy into the page cache it replaces) and writes the buffer whenever it is full.
The bytes of a partial buffer reach the file only when the caller asks for the descriptor
(:meth:`DirectWriter.fileno`, which callers do to ``fsync``) or closes the stream: the last
block is then written padded with zeros and the file truncated to its real length; later
writes rewrite that block in place. :meth:`~DirectWriter.flush` does not write: DCP flushes
after every item, and writing the partial buffer each time would send most of it twice. Where the file system
refuses ``O_DIRECT`` (``EINVAL``: tmpfs, some network file systems) at open or at the first
write, the bytes go through the ordinary handle instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import mmap
import os
from typing import IO, Any

import numpy as np

from reckpt.storage.errors import storage_error

__all__ = ["DIRECT_PIECE", "DirectWriter", "open_direct"]

DIRECT_PIECE = 4 << 20  # one write: with several files in flight, 2-4 MiB beat 16 MiB here
_ALIGN = 4096  # covers 512-byte and 4 KiB logical blocks
_MEMMOVE_MIN = 64 << 10  # smaller copies are cheaper under the GIL than through ctypes


def open_direct(path: str) -> int | None:
    """A write-only ``O_DIRECT`` descriptor of the existing file ``path``; ``None`` where refused."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise


def _address(view: memoryview) -> int:
    """The address of a buffer's first byte (read-only buffers too)."""
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


class DirectWriter(io.RawIOBase):
    """A sequential, write-only stream over an ``O_DIRECT`` descriptor (see the module doc).

    Args:
        raw: the file's ordinary handle, as the storage opened it (truncated, at offset 0);
            closed with this stream, and used instead if ``O_DIRECT`` writes are refused.
        fd: an ``O_DIRECT`` descriptor of the same file (:func:`open_direct`); closed here.
        path: the file's path, for error messages.
    """

    def __init__(self, raw: IO[bytes], fd: int, path: str) -> None:
        super().__init__()
        self._raw, self._fd, self._path = raw, fd, path
        self._map = mmap.mmap(-1, DIRECT_PIECE)  # page-aligned
        self._buf = memoryview(self._map)
        self._base = _address(self._buf)
        self._fill = 0  # bytes in the buffer
        self._disk = 0  # file offset of the buffer's first byte (a multiple of _ALIGN)
        self._direct = True
        self._finished = False
        self._error: BaseException | None = None

    @property
    def error(self) -> BaseException | None:
        """The first write failure (as :class:`~reckpt.storage.errors.StorageError` when it is one)."""
        return self._error or getattr(self._raw, "error", None)

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        src = memoryview(b).cast("B")
        if not self._direct:
            return int(self._raw.write(src) or len(src))
        pos = 0
        while pos < len(src):
            n = min(DIRECT_PIECE - self._fill, len(src) - pos)
            if n >= _MEMMOVE_MIN:  # ctypes calls release the GIL: writer threads copy in parallel
                ctypes.memmove(self._base + self._fill, _address(src[pos : pos + n]), n)
            else:
                self._buf[self._fill : self._fill + n] = src[pos : pos + n]
            self._fill += n
            pos += n
            if self._fill == DIRECT_PIECE:
                if not self._write_buffer(DIRECT_PIECE):  # refused: the rest the ordinary way
                    self._raw.write(src[pos:])
                    return len(src)
                self._disk += DIRECT_PIECE
                self._fill = 0
        return len(src)

    def _write_buffer(self, length: int) -> bool:
        """Write the buffer's first ``length`` bytes at its offset; ``False`` after a fallback."""
        done = 0
        try:
            while done < length:
                done += os.pwrite(self._fd, self._buf[done:length], self._disk + done)
        except OSError as e:
            if e.errno == errno.EINVAL and done == 0 and self._disk == 0:
                self._fall_back()
                return False
            self._error = storage_error(e, "write", self._path, 1)
            raise self._error from e
        return True

    def _fall_back(self) -> None:
        """``O_DIRECT`` refused: what the buffer holds, and everything after, via ``raw``."""
        self._direct = False
        self._raw.write(self._buf[: self._fill])
        self._fill = 0

    def flush(self) -> None:
        """Nothing to push for the ``O_DIRECT`` path (see the module docstring); else ``raw``'s."""
        if not self._direct and not self._finished:
            self._raw.flush()

    def _write_tail(self) -> None:
        """Put every byte written so far into the file (the last block padded, then truncated)."""
        if self._direct and self._fill:
            padded = -(-self._fill // _ALIGN) * _ALIGN
            ctypes.memset(self._base + self._fill, 0, padded - self._fill)
            if self._write_buffer(padded):
                try:
                    os.ftruncate(self._fd, self._disk + self._fill)
                except OSError as e:
                    self._error = storage_error(e, "write", self._path, 1)
                    raise self._error from e
        self.flush()

    def fileno(self) -> int:
        """The descriptor to ``fsync``: every byte written so far is in the file first."""
        self._write_tail()
        return self._fd

    def tell(self) -> int:
        return self._disk + self._fill

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._write_tail()
        finally:
            self._finished = True
            try:
                os.close(self._fd)
            finally:
                self._buf.release()
                with contextlib.suppress(BufferError):  # a failed write's traceback holds a slice
                    self._map.close()  # then the map goes with its last reference instead
                super().close()
                self._raw.close()
