"""O_DIRECT data files: exact bytes whatever the write sizes, flushes, refusals and failures."""

from __future__ import annotations

import errno
import itertools
import os
from pathlib import Path

import pytest

import reckpt
from reckpt.dcp import direct_write
from reckpt.dcp.direct_write import DIRECT_PIECE, DirectWriter, open_direct
from reckpt.storage.errors import StorageError
from tests.helpers import fresh, state_dicts_equal, trained
from tests.helpers.files import random_bytes


def _writer(path: Path) -> DirectWriter:
    raw = open(path, "wb")  # noqa: SIM115  (closed by the writer)
    fd = open_direct(str(path))
    if fd is None:
        raw.close()
        pytest.skip("this file system refuses O_DIRECT")
    return DirectWriter(raw, fd, str(path))


def test_any_sizes_with_flushes_between_make_the_exact_file(tmp_path: Path) -> None:
    """Unaligned sizes, pieces larger than the buffer, a flush (fsync point) then more bytes."""
    data = random_bytes(3 * DIRECT_PIECE + 12345)
    path = tmp_path / "f.bin"
    w = _writer(path)
    cuts = [0, 1, 4097, 100_000, DIRECT_PIECE + 3, 2 * DIRECT_PIECE + 70_000, len(data)]
    for a, b in itertools.pairwise(cuts):
        assert w.write(memoryview(data)[a:b]) == b - a
        w.flush()  # DCP flushes after every item: nothing written twice, nothing lost
        if a == 4097:
            os.fsync(w.fileno())  # DCP's fsync: every byte so far is in the file
            assert path.read_bytes() == data[:b]
    assert w.tell() == len(data)
    w.close()
    w.close()  # idempotent
    assert path.read_bytes() == data


def test_a_refused_first_write_falls_back_to_the_ordinary_handle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.pwrite

    def refuse(fd: int, data: object, offset: int) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    data = random_bytes(2 * DIRECT_PIECE + 5)
    path = tmp_path / "f.bin"
    w = _writer(path)
    monkeypatch.setattr(direct_write.os, "pwrite", refuse)
    w.write(data[:10])
    w.write(data[10:])
    monkeypatch.setattr(direct_write.os, "pwrite", real)
    w.close()
    assert path.read_bytes() == data


def test_a_full_disk_reads_as_a_storage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data: object, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    path = tmp_path / "f.bin"
    w = _writer(path)
    monkeypatch.setattr(direct_write.os, "pwrite", full)
    with pytest.raises(StorageError, match=r"f\.bin: write failed"):
        w.write(random_bytes(DIRECT_PIECE))
    assert isinstance(w.error, StorageError)
    monkeypatch.undo()
    w.close()


def test_a_saved_checkpoint_written_directly_restores_and_verifies(tmp_path: Path) -> None:
    m, o = trained()
    ck = reckpt.save_model(str(tmp_path / "model.ckpt-1"), m, o)
    assert reckpt.verify(ck).ok
    dest, opt = fresh()
    reckpt.restore_model(ck, dest, opt)
    assert state_dicts_equal(dest.state_dict(), m.state_dict())
