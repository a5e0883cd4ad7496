"""The disk-ceiling measurements write and read exactly the bytes they are given."""

from __future__ import annotations

from pathlib import Path

import pytest
from benchmarks import ceiling

from tests.helpers.files import random_bytes

MIB = 1 << 20


def test_split_cuts_the_bytes_in_order_on_aligned_boundaries() -> None:
    data = random_bytes(5 * MIB + 333)
    blobs = [memoryview(data)[:100], memoryview(data)[100 : 3 * MIB], memoryview(data)[3 * MIB :]]
    for streams in ceiling.STREAMS:
        runs = ceiling.split(blobs, streams)
        assert len(runs) == streams
        assert b"".join(bytes(v) for run in runs for v in run) == data
        assert all(sum(len(v) for v in run) % ceiling.ALIGN == 0 for run in runs[:-1])
    assert ceiling.split([memoryview(b"ab")], 4)[0][0] == b"ab"


@pytest.mark.parametrize("mode", ceiling.MODES)
def test_raw_write_then_read_in_every_mode(tmp_path: Path, mode: str) -> None:
    if mode == "O_DIRECT" and (why := ceiling.direct_io_support(str(tmp_path))) is not None:
        pytest.skip(why)
    data = random_bytes(2 * ceiling.PIECE + 4097)
    runs = ceiling.split([memoryview(data)], 3)
    paths = [str(tmp_path / f"{i}.bin") for i in range(3)]
    ceiling.raw_write(paths, runs, mode)
    assert b"".join(Path(p).read_bytes() for p in paths) == data
    for streams in ceiling.STREAMS:
        assert ceiling.raw_read(paths[0], streams) == Path(paths[0]).stat().st_size


def test_names_and_the_best_variant() -> None:
    assert ceiling.write_name(1, "buffered") == "raw write (1 stream)"
    assert ceiling.write_name(4, "O_DIRECT") == "raw write (4 streams, O_DIRECT)"
    assert ceiling.read_name(8) == "raw read (8 streams)"
    seconds = {"raw write (1 stream)": 2.0, "raw write (2 streams)": 1.0, "raw read (1 stream)": 0.5}
    assert ceiling.best(seconds, "raw write") == "raw write (2 streams)"
    assert ceiling.best(seconds, "nothing") is None
