"""Checksums computed while writing (and while reading), and their verification.

The algorithm is XXH3-64 (``xxhash``): it runs at memory speed and releases the GIL, so a
large buffer is hashed on a helper thread while the same buffer is written to (or read from)
the file: checksums add almost nothing to a save or a verified restore. The manifest records
the algorithm's name so a later format can change it.
"""

from __future__ import annotations

import contextlib
import io
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import xxhash

from reckpt.storage.fork_lock import ForkSafeLock

__all__ = [
    "CHECKSUM_ALGORITHM",
    "FileRecord",
    "HashingWriter",
    "SequentialHasher",
    "charge_hashing",
    "checksum_bytes",
    "hash_stream",
    "hash_wait_seconds",
    "read_some",
]

CHECKSUM_ALGORITHM = "xxh3_64"
_PIECE = 16 << 20  # large writes move in pieces, each hashed while the next one is written
_READ_PIECE = 2 << 20  # reads: small enough that the hasher finds the piece still in cache
_SCRATCH = 4 << 20  # buffers for bytes read only to be hashed
_THREADED = 1 << 20  # smaller buffers are hashed inline (a thread costs more than it saves)


def _new_hasher() -> Any:
    return xxhash.xxh3_64()


def checksum_bytes(data: bytes | memoryview) -> str:
    """Hex checksum of an in-memory buffer."""
    return str(xxhash.xxh3_64_hexdigest(data))


_clock_lock = ForkSafeLock()
_waited_s = 0.0


def hash_wait_seconds() -> float:
    """Seconds this process's writers and readers spent hashing rather than moving bytes.

    Counts inline hashing of small buffers and waits for a helper thread's hashing that the
    I/O did not hide: the checksums' cost on the critical path (a benchmark reads it before
    and after a save).
    """
    return _waited_s


def charge_hashing(seconds: float) -> None:
    """Add ``seconds`` of hashing on the critical path to :func:`hash_wait_seconds`."""
    global _waited_s
    with _clock_lock:
        _waited_s += seconds


_charge = charge_hashing


class _Background:
    """Feeds one hasher, in order, on one helper thread: at most one update in flight.

    :meth:`update` first waits for the previous update, so the caller may reuse a buffer
    two updates later; :meth:`wait` before a buffer handed over changes or goes away, and
    :meth:`close` when done (it ends the thread). The thread is started on the first large
    buffer and kept: no thread per buffer.
    """

    def __init__(self, hasher: Any) -> None:
        self.hasher = hasher
        self._tasks: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pending = False
        self._inline = False

    def update(self, view: memoryview) -> None:
        self.wait()
        if len(view) < _THREADED or not self._started():
            start = time.perf_counter()
            self.hasher.update(view)
            _charge(time.perf_counter() - start)
            return
        self._tasks.put(view)
        self._pending = True

    def _started(self) -> bool:
        """Start the helper thread once; ``False`` when no thread can be started.

        An async save that is still running while the interpreter shuts down (a script that
        never closed its manager) cannot start threads on Python 3.12.0-3.12.2 (``RuntimeError:
        can't create new thread at interpreter shutdown``): it then hashes on its own thread.
        """
        if self._thread is None and not self._inline:
            thread = threading.Thread(target=self._run, name="reckpt-hash", daemon=True)
            try:
                thread.start()
            except RuntimeError:
                self._inline = True
            else:
                self._thread = thread
        return self._thread is not None

    def _run(self) -> None:
        while (view := self._tasks.get()) is not None:
            try:
                self.hasher.update(view)
            except BaseException as e:  # handed to the caller by wait()
                self._done.put(e)
            else:
                self._done.put(None)

    def wait(self) -> None:
        if self._pending:
            start = time.perf_counter()
            error = self._done.get()
            self._pending = False
            _charge(time.perf_counter() - start)
            if error is not None:
                raise error

    def close(self) -> None:
        """Wait for the last update and end the helper thread (idempotent)."""
        try:
            self.wait()
        finally:
            if self._thread is not None:
                self._tasks.put(None)
                self._thread.join()
                self._thread = None


def read_some(stream: IO[bytes], view: memoryview) -> int:
    """One read into ``view`` (``readinto``, or ``read`` and a copy); 0 at the end."""
    readinto = getattr(stream, "readinto", None)
    if callable(readinto):
        return int(readinto(view) or 0)
    data = stream.read(len(view))
    view[: len(data)] = data
    return len(data)


def hash_stream(stream: IO[bytes]) -> tuple[int, str]:
    """``(size, checksum)`` of everything left in a binary stream.

    Two 4 MiB buffers alternate: one is hashed on a helper thread while the other is read.
    """
    hasher = _new_hasher()
    background = _Background(hasher)
    bufs = [memoryview(bytearray(_SCRATCH)), memoryview(bytearray(_SCRATCH))]
    size, i = 0, 0
    try:
        while n := read_some(stream, bufs[i]):
            background.update(bufs[i][:n])
            size += n
            i ^= 1
    finally:
        background.close()
    return size, str(hasher.hexdigest())


class SequentialHasher:
    """Reads a file front to back exactly once, hashing every byte on the way.

    A verified restore reads each tensor straight into its destination with
    :meth:`readinto`; bytes it does not need (archive headers, items other readers take)
    pass through :meth:`skip_to` into scratch buffers. :meth:`finish` reads to the end and
    returns ``(size, checksum)`` of the whole file, comparable with the manifest's record.
    Hashing runs on a helper thread while the next piece is read. The caller must not
    change a destination before :meth:`wait` (``readinto`` may still be hashing its tail).
    """

    def __init__(self, stream: IO[bytes]) -> None:
        self._f = stream
        self.pos = 0
        self._background = _Background(_new_hasher())
        self._scratch: list[memoryview] = []  # allocated on the first skip
        self._turn = 0

    def readinto(self, view: memoryview) -> int:
        """Fill ``view`` with the next bytes (fewer only at the end of the file)."""
        if self._f.tell() != self.pos:  # someone else moved a shared stream (fsspec's memory files)
            self._f.seek(self.pos)
        got = 0
        while got < len(view):
            piece = view[got : got + _READ_PIECE]
            n = read_some(self._f, piece)
            if n == 0:
                break
            self._background.update(piece[:n])
            got += n
            self.pos += n
        return got

    def skip_to(self, offset: int) -> None:
        """Hash (without keeping) the bytes up to ``offset``; a no-op if already past it."""
        while self.pos < offset:
            buf = self._buffer()
            if self.readinto(buf[: min(len(buf), offset - self.pos)]) == 0:
                return

    def _buffer(self) -> memoryview:
        """The scratch buffer not in use by the helper thread (two alternate)."""
        if not self._scratch:
            self._scratch = [memoryview(bytearray(_SCRATCH)), memoryview(bytearray(_SCRATCH))]
        self._turn ^= 1
        return self._scratch[self._turn]

    def wait(self) -> None:
        """Wait until every byte read so far is hashed."""
        self._background.wait()

    def finish(self) -> tuple[int, str]:
        """Read to the end of the file; ``(size, checksum)`` of all of it. Ends the helper."""
        try:
            while self.readinto(self._buffer()):
                pass
        finally:
            self.close()
        return self.pos, str(self._background.hasher.hexdigest())

    def close(self) -> None:
        """End the helper thread (after an error; :meth:`finish` does it otherwise)."""
        self._background.close()


_unhashed_lock = ForkSafeLock()
_unhashed_users = 0


@contextlib.contextmanager
def _unhashed_writes() -> Iterator[None]:
    """Internal, for the checksum A/B of ``benchmarks/save_restore.py`` only: no hashing.

    Every :class:`HashingWriter` created while any caller is inside counts bytes but does
    not hash them, and records an empty checksum, so the same save can be timed with and
    without its checksums. A checkpoint written so fails verification; reckpt itself never
    enters this.
    """
    global _unhashed_users
    with _unhashed_lock:
        _unhashed_users += 1
    try:
        yield
    finally:
        with _unhashed_lock:
            _unhashed_users -= 1


@dataclass(frozen=True, slots=True)
class FileRecord:
    """Size and checksum of one written file (path relative to the checkpoint)."""

    path: str
    size: int
    checksum: str


class HashingWriter(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through it.

    It forwards ``write``, ``tell``, ``flush`` and ``fileno`` (for fsync) to the
    wrapped file; ``on_close`` receives ``(size, checksum)`` once, when closed. A write of
    1 MiB or more goes out in pieces of up to 16 MiB, each hashed on a helper thread while it
    is written; with ``writeback`` (a local file) the kernel is asked to start writing each
    piece to disk at once, so the final fsync finds little left to do.
    """

    def __init__(self, raw: IO[bytes], on_close: Any, *, writeback: bool = False) -> None:
        super().__init__()
        self._raw = raw
        self._hasher = _new_hasher()
        self._background = _Background(self._hasher)
        self._size = 0
        self._on_close = on_close
        self._lock = threading.Lock()
        self._writeback = writeback
        self._hashing = _unhashed_users == 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        if len(view) < _THREADED:
            written = self._raw.write(view)
            n = len(view) if written is None else int(written)
            if self._hashing:
                self._background.update(view[:n])  # hashed inline at this size
            self._size += n
            return n
        try:
            for start in range(0, len(view), _PIECE):
                piece = view[start : start + _PIECE]
                if self._hashing:
                    self._background.update(piece)
                done = 0
                while done < len(piece):
                    written = self._raw.write(piece[done:])
                    done += len(piece) - done if written is None else int(written)
                if self._writeback:
                    self._start_writeback(self._size, len(piece))
                self._size += len(piece)
        finally:
            self._background.wait()  # the caller may reuse its buffer once we return
        return len(view)

    def _start_writeback(self, offset: int, length: int) -> None:
        from reckpt.storage.writeback import start_writeback

        try:
            fd = self.fileno()
        except (OSError, ValueError, io.UnsupportedOperation):
            self._writeback = False
            return
        start_writeback(fd, offset, length)

    def tell(self) -> int:
        return self._size

    def flush(self) -> None:
        self._raw.flush()

    def fileno(self) -> int:
        # Callers fsync the descriptor: push buffered bytes to the OS first.
        self._raw.flush()
        return int(self._raw.fileno())

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            try:
                self._background.close()
                super().close()  # flushes through to the wrapped file
            finally:
                self._raw.close()
            self._on_close(self._size, str(self._hasher.hexdigest()) if self._hashing else "")
