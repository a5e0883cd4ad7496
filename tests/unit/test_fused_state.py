"""Row-wise optimizer state between column layouts, and dense <-> fused key renaming (pure)."""

from __future__ import annotations

import pytest
import torch

from reckpt.sharding.fused_state import (
    RowwiseConversion,
    column_splits,
    convert_rowwise,
    dense_fused_rename_rule,
    rowwise_parts,
)

HALVES = ((0, 4), (4, 8))
WHOLE = ((0, 8),)


def test_column_shards_combine_into_the_width_weighted_mean() -> None:
    m = torch.tensor([1.0, 2.0, 3.0, 5.0, 7.0, 11.0])  # 3 rows x 2 column shards of width 4
    got = convert_rowwise(m, 3, HALVES, WHOLE)
    assert got is not None and torch.equal(got, m[:3] * 0.5 + m[3:] * 0.5)
    uneven = convert_rowwise(m, 3, ((0, 2), (2, 8)), WHOLE)
    assert uneven is not None and torch.equal(uneven, m[:3] * 0.25 + m[3:] * 0.75)


@pytest.mark.parametrize(
    ("src", "dst", "exact"),
    [
        (WHOLE, WHOLE, True),
        (HALVES, HALVES, True),
        (HALVES, WHOLE, True),
        (((0, 2), (2, 4), (4, 6), (6, 8)), HALVES, True),
        (WHOLE, HALVES, False),
        (HALVES, ((0, 2), (2, 8)), False),
        (((0, 3), (3, 8)), HALVES, False),
    ],
)
def test_what_is_exact(
    src: tuple[tuple[int, int], ...], dst: tuple[tuple[int, int], ...], exact: bool
) -> None:
    rows = 2
    m = torch.arange(rows * len(src), dtype=torch.float32)
    got = convert_rowwise(m, rows, src, dst)
    assert (got is not None) == exact
    if got is not None and src == dst:
        assert torch.equal(got, m)


def test_column_splits_from_shard_boxes() -> None:
    assert column_splits([((0, 0), (4, 8)), ((4, 0), (4, 8))], 8) == WHOLE  # row-wise
    assert column_splits([((0, 4), (8, 4)), ((0, 0), (8, 4))], 8) == HALVES  # column-wise
    assert column_splits([((0, 0), (4, 4)), ((4, 4), (4, 4))], 8) is None  # grid
    assert column_splits([], 8) == WHOLE


def test_dense_fused_rename_rule() -> None:
    fused = {"state.ebc.embedding_bags.t.weight.t.momentum1"}
    assert dense_fused_rename_rule("state.ebc.embedding_bags.t.weight.sum", fused) == next(iter(fused))
    assert dense_fused_rename_rule("state.ebc.embedding_bags.u.weight.sum", fused) is None
    dense = {"state.ebc.embedding_bags.t.weight.exp_avg", "state.ebc.embedding_bags.t.weight.exp_avg_sq"}
    key = "state.ebc.embedding_bags.t.weight.t.momentum2"
    assert dense_fused_rename_rule(key, dense) == "state.ebc.embedding_bags.t.weight.exp_avg_sq"
    assert dense_fused_rename_rule("model.weight", dense) is None


def test_rowwise_parts_of_a_grown_column_sharded_table_are_per_shard() -> None:
    """12 rows -> 16 rows, two column shards: each shard's first 12 rows, not the flat overlap."""
    saved = torch.arange(24, dtype=torch.float32)  # shard 0: rows 0-11, shard 1: rows 0-11
    parts = rowwise_parts(saved, 12, 16, HALVES, HALVES)
    assert parts is not None
    assert torch.equal(parts[0], saved[:12]) and torch.equal(parts[1], saved[12:])
    shrunk = rowwise_parts(saved, 12, 5, HALVES, HALVES)
    assert shrunk is not None and torch.equal(shrunk[1], saved[12:17])


def test_rowwise_parts_of_a_wider_table_keep_the_new_columns() -> None:
    saved = torch.arange(6, dtype=torch.float32)  # 3 rows x HALVES (width 8)
    parts = rowwise_parts(saved, 3, 3, HALVES, ((0, 4), (4, 8), (8, 12)))
    assert parts is not None and parts[2] is None
    assert torch.equal(parts[0], saved[:3]) and torch.equal(parts[1], saved[3:])
    # (4, 12) covers saved (4, 8) only: its value comes from that part alone.
    wide = rowwise_parts(saved, 3, 3, HALVES, ((0, 4), (4, 12)))
    assert wide is not None and torch.equal(wide[1], saved[3:])
    assert rowwise_parts(saved, 3, 3, HALVES, ((0, 6), (6, 12))) is None  # (4, 8) straddles 6


def test_conversion_marks_what_it_loads() -> None:
    conv = RowwiseConversion(
        key="state.w.t.momentum1",
        fqn="w",
        name="t.momentum1",
        source="state.w.t.momentum1",
        source_shape=(6,),
        shape=(8,),
        rows=4,
        src_rows=3,
        src_splits=HALVES,
        dst_splits=HALVES,
    )
    got = conv.convert(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    assert got is not None and conv.partial
    values, loaded = got
    assert values[loaded].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert loaded.tolist() == [True, True, True, False, True, True, True, False]
