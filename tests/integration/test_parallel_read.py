"""Parallel reads of local files: destinations filled exactly, whole files hashed in order."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from reckpt.dcp.parallel_read import FileRead, read_files
from reckpt.format.integrity import checksum_bytes
from tests.helpers.files import random_bytes

MIB = 1 << 20


def _spans(
    data: bytes, ranges: list[tuple[int, int]]
) -> tuple[list[tuple[int, memoryview]], list[bytearray]]:
    bufs = [bytearray(n) for _, n in ranges]
    return [(off, memoryview(b)) for (off, _), b in zip(ranges, bufs, strict=True)], bufs


def _open(path: Path, data: bytes) -> int:
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


def test_destinations_and_the_whole_files_checksum(tmp_path: Path) -> None:
    """Spans go to their buffers; the gaps between them count in the checksum, in order."""
    data = random_bytes(9 * MIB + 4321)
    ranges = [(0, 5), (100, 3 * MIB + 7), (4 * MIB, 2 * MIB), (9 * MIB, 4000)]
    spans, bufs = _spans(data, ranges)
    fd = _open(tmp_path / "a.bin", data)
    try:
        read = FileRead(fd, spans, hash_all=True)
        read_files([read], threads=3, piece=MIB // 2)  # many pieces, a small read-ahead window
    finally:
        os.close(fd)
    assert [bytes(b) for b in bufs] == [data[o : o + n] for o, n in ranges]
    assert (read.size, read.checksum, read.short) == (len(data), checksum_bytes(data), False)


def test_several_files_each_hashed_or_not(tmp_path: Path) -> None:
    one, two = random_bytes(3 * MIB + 1), random_bytes(2 * MIB)
    s1, b1 = _spans(one, [(10, MIB)])
    s2, b2 = _spans(two, [(0, len(two))])
    fds = [_open(tmp_path / "1.bin", one), _open(tmp_path / "2.bin", two)]
    try:
        reads = [FileRead(fds[0], s1, hash_all=False), FileRead(fds[1], s2, hash_all=True)]
        read_files(reads, threads=2, piece=256 * 1024)
    finally:
        for fd in fds:
            os.close(fd)
    assert bytes(b1[0]) == one[10 : 10 + MIB] and bytes(b2[0]) == two
    assert reads[0].checksum == "" and reads[0].size == MIB  # only its span was read
    assert reads[1].checksum == checksum_bytes(two)


def test_a_flipped_byte_in_a_gap_changes_the_checksum(tmp_path: Path) -> None:
    data = bytearray(random_bytes(2 * MIB))
    want = checksum_bytes(bytes(data))
    data[MIB + 3] ^= 1  # outside every destination
    spans, _ = _spans(bytes(data), [(0, MIB)])
    fd = _open(tmp_path / "a.bin", bytes(data))
    try:
        read = FileRead(fd, spans, hash_all=True)
        read_files([read])
    finally:
        os.close(fd)
    assert read.checksum != want


def test_a_truncated_file_is_reported_short(tmp_path: Path) -> None:
    data = random_bytes(MIB)
    spans, _ = _spans(data, [(MIB // 2, MIB)])  # ends past the end of the file
    fd = _open(tmp_path / "a.bin", data)
    try:
        read = FileRead(fd, spans, hash_all=True)
        read_files([read], piece=64 * 1024)
    finally:
        os.close(fd)
    assert read.short and read.size == len(data) and read.checksum == checksum_bytes(data)


def test_reads_inline_where_no_thread_can_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Python 3.12.0-3.12.2 at interpreter exit: every piece read on the caller's thread."""

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    data = random_bytes(3 * MIB + 17)
    spans, bufs = _spans(data, [(17, 3 * MIB)])
    fd = _open(tmp_path / "a.bin", data)
    monkeypatch.setattr(threading.Thread, "start", refuse)
    try:
        read = FileRead(fd, spans, hash_all=True)
        read_files([read], piece=MIB)
    finally:
        os.close(fd)
    assert bytes(bufs[0]) == data[17 : 17 + 3 * MIB] and read.checksum == checksum_bytes(data)


def test_a_failed_read_is_raised_after_the_readers_stop(tmp_path: Path) -> None:
    data = random_bytes(2 * MIB)
    fd = _open(tmp_path / "a.bin", data)
    os.close(fd)  # a descriptor that no longer exists: every pread fails
    spans, _ = _spans(data, [(0, 2 * MIB)])
    before = threading.active_count()
    with pytest.raises(OSError):
        read_files([FileRead(fd, spans)], threads=4, piece=256 * 1024)
    assert threading.active_count() == before
