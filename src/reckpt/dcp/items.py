"""Direct access to the tensor items of a DCP file: where an item's raw bytes start.

DCP writes every tensor item as a ``torch.save`` archive (an uncompressed zip) whose single
storage holds the item's contiguous bytes. Knowing where that storage begins inside the
file lets a reader put the bytes straight into their destination tensor: no unpickling, no
temporary tensor, no second copy. Every function here falls back (returns ``None``) on
anything else, and callers then take DCP's own path.
"""

from __future__ import annotations

import io
import struct
import sys
import zipfile
from typing import IO, Any, cast

from reckpt.format.integrity import read_some

__all__ = ["Window", "data_offset", "member_stream", "read_full", "storage_member", "stored_bytes"]

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra length


def storage_member(zf: zipfile.ZipFile, nbytes: int) -> str | None:
    """The archive's one uncompressed little-endian storage of ``nbytes`` bytes, or ``None``."""
    names = zf.namelist()
    data = [n for n in names if "/data/" in n and not n.endswith("/")]
    order = [n for n in names if n.endswith("/byteorder")]
    if len(data) != 1 or sys.byteorder != "little":
        return None
    if order and stored_bytes(zf, order[0]) != b"little":
        return None
    info = zf.getinfo(data[0])
    if info.compress_type != zipfile.ZIP_STORED or info.file_size != nbytes:
        return None
    return data[0]


def _member_start(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> int | None:
    """Offset (in the archive) of a stored member's bytes, from its local header."""
    fp = cast(IO[bytes], zf.fp)
    fp.seek(info.header_offset)
    raw = fp.read(_LOCAL_HEADER.size)
    if len(raw) != _LOCAL_HEADER.size:
        return None
    signature, name_len, extra_len = _LOCAL_HEADER.unpack(raw)
    if signature != b"PK\x03\x04":
        return None
    return int(info.header_offset) + _LOCAL_HEADER.size + int(name_len) + int(extra_len)


def member_stream(zf: zipfile.ZipFile, name: str) -> IO[bytes]:
    """A read-only stream over an uncompressed member's bytes, read without the zip CRC-32 check.

    reckpt writes archives without per-record CRCs (``torch.save`` with CRC off, as
    ``torch.load`` accepts): the file's XXH3 checksum in the manifest covers these bytes.

    Raises:
        zipfile.BadZipFile: the member is compressed or its local header is damaged.
    """
    info = zf.getinfo(name)
    start = _member_start(zf, info) if info.compress_type == zipfile.ZIP_STORED else None
    if start is None:
        raise zipfile.BadZipFile(f"{name}: not an uncompressed member")
    return cast(IO[bytes], Window(cast(IO[bytes], zf.fp), start, info.file_size))


def stored_bytes(zf: zipfile.ZipFile, name: str) -> bytes | None:
    """A small uncompressed member's bytes (see :func:`member_stream`); ``None`` if unreadable."""
    try:
        return member_stream(zf, name).read()
    except zipfile.BadZipFile:
        return None


class Window(io.RawIOBase):
    """A read-only, seekable view of ``length`` bytes of ``f`` from ``offset``."""

    def __init__(self, f: IO[bytes], offset: int, length: int) -> None:
        super().__init__()
        self._f, self._start, self._len, self._pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._len}[whence]
        self._pos = max(0, min(self._len, base + pos))
        return self._pos

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        n = min(len(view), self._len - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._start + self._pos)
        got = read_some(self._f, view[:n])
        self._pos += got
        return got


def read_full(src: IO[bytes], buf: bytearray | memoryview) -> int:
    """Fill ``buf`` from ``src`` (several reads if need be); the bytes read."""
    view = memoryview(buf)
    got = 0
    while got < len(view) and (n := read_some(src, view[got:])):
        got += n
    return got


def data_offset(f: IO[bytes], item_offset: int, item_length: int, nbytes: int) -> int | None:
    """Absolute offset in ``f`` of the raw bytes of a tensor item holding ``nbytes`` bytes.

    ``None`` when the item is not a single uncompressed little-endian storage of that size.
    """
    try:
        with zipfile.ZipFile(Window(f, item_offset, item_length)) as zf:
            member = storage_member(zf, nbytes)
            if member is None:
                return None
            at = _member_start(zf, zf.getinfo(member))
    except (zipfile.BadZipFile, OSError, KeyError, struct.error):
        return None
    if at is None:
        return None
    start = item_offset + at
    return start if start + nbytes <= item_offset + item_length else None
