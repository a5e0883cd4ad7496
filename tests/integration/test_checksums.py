"""Checksums computed while writing and while reading match a plain hash of the same bytes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import reckpt
from reckpt.dcp.writer import zip_crc32_off
from reckpt.format.integrity import HashingWriter, checksum_bytes, hash_stream
from reckpt.storage.writeback import start_writeback
from tests.helpers.files import random_bytes

MIB = 1 << 20


@pytest.mark.parametrize("sizes", [[10], [3 * MIB], [40 * MIB + 7], [5, 2 * MIB, 17 * MIB, 1, 0, 33 * MIB]])
def test_hashing_writer_matches_a_plain_hash(tmp_path: Path, sizes: list[int]) -> None:
    """Small writes hash inline, large ones in pieces on a helper thread: same checksum."""
    chunks = [random_bytes(n, i) for i, n in enumerate(sizes)]
    records: list[tuple[int, str]] = []
    path = tmp_path / "f.bin"
    with open(path, "wb") as raw:
        writer = HashingWriter(raw, lambda size, c: records.append((size, c)), writeback=True)
        for chunk in chunks:
            assert writer.write(memoryview(chunk)) == len(chunk)
        writer.close()
    whole = b"".join(chunks)
    assert records == [(len(whole), checksum_bytes(whole))]
    assert path.read_bytes() == whole
    with open(path, "rb") as f:
        assert hash_stream(f) == (len(whole), checksum_bytes(whole))


def test_writeback_request_is_harmless(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    with open(path, "wb") as f:
        f.write(b"x" * MIB)
        start_writeback(f.fileno(), 0, MIB)  # True on Linux, False where unsupported
    assert path.read_bytes() == b"x" * MIB


def test_zip_crc_is_off_only_inside_and_archives_still_load(tmp_path: Path) -> None:
    """reckpt writes torch.save archives without the zip CRC; torch.load and DCP read them."""
    import torch.distributed.checkpoint as dcp

    before = torch.serialization.get_crc32_options()
    with zip_crc32_off():
        with zip_crc32_off():
            assert torch.serialization.get_crc32_options() is False
        assert torch.serialization.get_crc32_options() is False
    assert torch.serialization.get_crc32_options() == before
    model = torch.nn.Linear(64, 32)
    ckpt = str(tmp_path / "model.ckpt-1")
    reckpt.save_model(ckpt, model)
    sd = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    dcp.load(sd, checkpoint_id=os.path.join(ckpt, "model"), no_dist=True)  # plain DCP, TorchEasyRec's path
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
