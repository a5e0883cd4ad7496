"""Checksums computed while writing, and their verification.

The algorithm is XXH3-64 (``xxhash``): it runs at memory speed, so hashing every
byte costs a few percent of a save. The manifest records the algorithm's name so a
later format can change it.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from typing import IO, Any

import xxhash

__all__ = ["CHECKSUM_ALGORITHM", "FileRecord", "HashingWriter", "checksum_bytes", "hash_stream"]

CHECKSUM_ALGORITHM = "xxh3_64"
_CHUNK = 8 << 20


def _new_hasher() -> Any:
    return xxhash.xxh3_64()


def checksum_bytes(data: bytes | memoryview) -> str:
    """Hex checksum of an in-memory buffer."""
    return str(xxhash.xxh3_64_hexdigest(data))


def hash_stream(stream: IO[bytes]) -> tuple[int, str]:
    """``(size, checksum)`` of everything left in a binary stream, read in 8 MiB chunks."""
    hasher = _new_hasher()
    size = 0
    readinto = getattr(stream, "readinto", None)
    if not callable(readinto):
        while chunk := stream.read(_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
        return size, str(hasher.hexdigest())
    buf = memoryview(bytearray(_CHUNK))  # one buffer for the whole file: no allocation per chunk
    while n := int(readinto(buf) or 0):
        hasher.update(buf[:n])
        size += n
    return size, str(hasher.hexdigest())


@dataclass(frozen=True, slots=True)
class FileRecord:
    """Size and checksum of one written file (path relative to the checkpoint)."""

    path: str
    size: int
    checksum: str


class HashingWriter(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through it.

    It forwards ``write``, ``tell``, ``flush`` and ``fileno`` (for fsync) to the
    wrapped file; ``on_close`` receives ``(size, checksum)`` once, when closed.
    """

    def __init__(self, raw: IO[bytes], on_close: Any) -> None:
        super().__init__()
        self._raw = raw
        self._hasher = _new_hasher()
        self._size = 0
        self._on_close = on_close
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        written = self._raw.write(view)
        n = len(view) if written is None else int(written)
        self._hasher.update(view[:n])
        self._size += n
        return n

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
                super().close()  # flushes through to the wrapped file
            finally:
                self._raw.close()
            self._on_close(self._size, str(self._hasher.hexdigest()))
