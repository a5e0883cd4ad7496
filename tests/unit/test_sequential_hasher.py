"""Hashing a stream while it is read: skipped and taken bytes alike, in memory (no files)."""

from __future__ import annotations

import io

from reckpt.format.integrity import SequentialHasher, checksum_bytes
from tests.helpers.files import random_bytes

MIB = 1 << 20


def test_sequential_hasher_hashes_skipped_and_taken_bytes_alike() -> None:
    """Ranges read into the caller's buffers and ranges skipped both count, in file order."""
    data = random_bytes(50 * MIB + 123)
    stream = io.BytesIO(data)
    seq = SequentialHasher(stream)
    seq.skip_to(100)
    dest = bytearray(20 * MIB)
    assert seq.readinto(memoryview(dest)) == len(dest)
    seq.wait()
    assert bytes(dest) == data[100 : 100 + len(dest)]
    stream.seek(0)  # someone else moved the shared stream: the hasher carries on where it was
    seq.skip_to(25 * MIB)
    seq.skip_to(10)  # behind: no-op
    tail = bytearray(MIB)
    seq.readinto(memoryview(tail))
    assert bytes(tail) == data[25 * MIB : 26 * MIB]
    assert seq.finish() == (len(data), checksum_bytes(data))


def test_sequential_hasher_detects_a_flipped_byte() -> None:
    data = bytearray(random_bytes(3 * MIB))
    want = checksum_bytes(bytes(data))
    data[MIB] ^= 1
    assert SequentialHasher(io.BytesIO(bytes(data))).finish() != (len(data), want)
