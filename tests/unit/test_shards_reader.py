"""The trainer's Parquet reader on real files: row-group streaming, batches across files,
positions per batch, padding to a common step count, resume of a mid-pass position."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reckpt.errors import ConfigError
from reckpt.format.dataloader_state import DATA_WORLD_SIZE, EPOCHS_COMPLETED, merge_dataloader_states
from reckpt.trainer.config import DataConfig
from reckpt.trainer.data import ParquetReader

CFG = DataConfig(dense_columns=["d0"], sparse_columns=["s0", "s1"], batch_size=7)
TABLES = {"s0": 100, "s1": 100}


@pytest.fixture
def files(tmp_path: Path) -> list[str]:
    """Three files (23, 0 and 41 rows) in row groups of 5 and 9 rows; row ids 0..63 in order."""
    out, first = [], 0
    for i, (n, group) in enumerate([(23, 5), (0, 5), (41, 9)]):
        ids = np.arange(first, first + n, dtype=np.int64)
        lists = pa.array([[int(x), int(x) + 1][: 1 + int(x) % 2] for x in ids], pa.list_(pa.int64()))
        table = pa.table(
            {
                "label": (ids % 2).astype(np.float32),
                "d0": ids.astype(np.float32),
                "s0": ids,
                "s1": lists,
                "row_id": ids,
            }
        )
        path = tmp_path / f"part-{i}.parquet"
        pq.write_table(table, path, row_group_size=group)
        out.append(str(path))
        first += n
    return out


def read_all(reader: ParquetReader, position: dict | None = None) -> list:
    return list(reader.batches(position))


def test_streams_by_row_group_and_fills_batches_across_files(files: list[str], monkeypatch) -> None:
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("a whole-file read"))
    reader = ParquetReader(files, CFG, 0, 1, TABLES, row_ids=True)
    batches = read_all(reader)
    assert [b.rows for b in batches] == [7] * 9 + [1]
    assert np.concatenate([b.row_ids for b in batches]).tolist() == list(range(64))
    third = batches[3]  # rows 21..27: the end of file 0, the start of file 2
    assert third.row_ids.tolist() == list(range(21, 28))
    assert third.position == {f"{files[0]}:0": 22, f"{files[2]}:0": 4}
    assert third.dense[:, 0].tolist() == [float(x) for x in range(21, 28)]
    lengths = third.sparse["s1"].lengths().tolist()
    assert lengths == [1 + x % 2 for x in range(21, 28)]
    assert third.sparse["s1"].values().tolist() == [v for x in range(21, 28) for v in [x, x + 1][: 1 + x % 2]]


def test_ranks_pad_to_the_same_step_count_and_read_every_row_once(files: list[str]) -> None:
    for world in (2, 3, 5):
        readers = [ParquetReader(files, CFG, r, world, TABLES, row_ids=True) for r in range(world)]
        per_rank = [read_all(r) for r in readers]
        assert len({len(b) for b in per_rank}) == 1, "every rank runs the same number of steps"
        real = [b for bs in per_rank for b in bs if not b.padding]
        assert sorted(np.concatenate([b.row_ids for b in real]).tolist()) == list(range(64))
        pads = [b for bs in per_rank for b in bs if b.padding]
        assert all(b.rows == 0 and b.position == {} and b.sparse.values().numel() == 0 for b in pads)


def test_a_mid_pass_position_resumes_on_2_and_is_redivided_on_3(files: list[str]) -> None:
    two = [ParquetReader(files, CFG, r, 2, TABLES, row_ids=True) for r in range(2)]
    streams = [read_all(r) for r in two]
    head = [[b for b in s[:3]] for s in streams]  # three steps, then a save
    position = merge_dataloader_states(
        [{EPOCHS_COMPLETED: 0, DATA_WORLD_SIZE: 2}] + [b.position for s in head for b in s]
    )
    position = two[0].adopt(position, "ck")
    again = [read_all(r, position) for r in two]
    assert [[b.row_ids.tolist() for b in s] for s in again] == [
        [b.row_ids.tolist() for b in s[3:]] for s in streams
    ]
    three = [ParquetReader(files, CFG, r, 3, TABLES, row_ids=True) for r in range(3)]
    layout = three[0].plan(position)
    assert layout.redivided and max(layout.rank_rows) - min(layout.rank_rows) <= 1
    rest = [b for r in three for b in read_all(r, layout) if not b.padding]
    done = [b for s in head for b in s]
    ids = sorted(np.concatenate([b.row_ids for b in done + rest]).tolist())
    assert ids == list(range(64))


def test_missing_columns_and_empty_data_are_clear_errors(files: list[str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"column\(s\) \['d9'\] named in \[data\] are not in the file"):
        ParquetReader(files, DataConfig(dense_columns=["d9"], sparse_columns=["s0"]), 0, 1, TABLES)
    bare = tmp_path / "bare.parquet"
    pq.write_table(pa.table({"label": [0.0], "d0": [1.0], "s0": [1], "s1": [[1]]}), bare)
    with pytest.raises(ConfigError, match=r"column\(s\) \['row_id'\] \(row_id is read to log trained rows"):
        ParquetReader([str(bare)], CFG, 0, 1, TABLES, row_ids=True)
    with pytest.raises(ConfigError, match=r"no rows to read \(empty Parquet\)"):
        ParquetReader([files[1]], CFG, 0, 1, TABLES)
