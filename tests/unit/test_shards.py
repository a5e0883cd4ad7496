"""The division of a data pass among ranks, and elastic resume of a saved position (no I/O).

Consumption is simulated the way the trainer consumes: every step each rank takes the next
``batch`` rows of its pieces (crossing piece boundaries), then its position keys are merged
key-wise with ``max`` as a checkpoint save does.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from reckpt.errors import ConfigError
from reckpt.format.dataloader_state import DATA_WORLD_SIZE, EPOCHS_COMPLETED, merge_dataloader_states
from reckpt.trainer.shards import Layout, by_file_ranges, plan_pass, read_position

PATHS = ["/d/a.parquet", "/d/b.parquet", "/d/c.parquet"]


def rank_batches(layout: Layout, rank: int, batch: int) -> list[list[tuple[int, int, str]]]:
    """Rank ``rank``'s batches: lists of ``(file, row, position key)``."""
    rows = [
        (p.file, r, f"{PATHS[p.file]}:{p.key_start}")
        for p in layout.pieces[rank]
        for r in range(p.start, p.end)
    ]
    return [rows[i : i + batch] for i in range(0, len(rows), batch)]


def consume(layout: Layout, steps: int, batch: int) -> tuple[dict[str, Any], list[list[tuple[int, int]]]]:
    """Run ``steps`` lockstep steps of ``layout``: the merged position and each step's rows (all ranks)."""
    per_rank = [rank_batches(layout, r, batch) for r in range(layout.world_size)]
    states = [dict(layout.position) for _ in range(layout.world_size)]
    trained = []
    for s in range(steps):
        step_rows = []
        for r, batches in enumerate(per_rank):
            if s < len(batches):
                for f, row, key in batches[s]:
                    states[r][key] = max(states[r].get(key, -1), row)
                    step_rows.append((f, row))
        trained.append(step_rows)
    return merge_dataloader_states(states), trained


def all_rows(rows: list[int]) -> list[tuple[int, int]]:
    return [(f, r) for f, n in enumerate(rows) for r in range(n)]


def test_a_fresh_pass_reads_every_row_once_and_drops_none() -> None:
    rows = [1001, 7, 0]
    for world in (1, 2, 3, 5, 8):
        lay = plan_pass(None, PATHS, rows, world)
        got = sorted((p.file, r) for ps in lay.pieces for p in ps for r in range(p.start, p.end))
        assert got == all_rows(rows)
        assert not lay.redivided and lay.position == {EPOCHS_COMPLETED: 0, DATA_WORLD_SIZE: world}
        assert max(lay.rank_rows) - min(lay.rank_rows) <= len(rows)
        assert [[(p.file, p.start, p.end) for p in ps] for ps in lay.pieces] == [
            by_file_ranges(rows, world, r) for r in range(world)
        ]


@pytest.mark.parametrize("seed", range(40))
def test_resumes_on_any_number_of_processes_read_every_row_exactly_once(seed: int) -> None:
    rnd = random.Random(seed)
    rows = [rnd.randint(0, 300) for _ in PATHS]
    rows[0] += 1
    batch = rnd.randint(1, 40)
    world = rnd.randint(1, 5)
    lay = plan_pass({EPOCHS_COMPLETED: 3}, PATHS, rows, world)
    seen: list[tuple[int, int]] = []
    for _ in range(rnd.randint(1, 4)):  # a chain of restarts on changing numbers of processes
        steps = rnd.randint(0, lay.steps(batch))
        position, trained = consume(lay, steps, batch)
        seen += [x for step in trained for x in step]
        world = rnd.randint(1, 5)
        lay = plan_pass(position, PATHS, rows, world)
        assert lay.position[EPOCHS_COMPLETED] == 3 and lay.position[DATA_WORLD_SIZE] == world
        assert lay.consumed_rows == len(seen)
        if lay.redivided:  # the rest is divided evenly (to one row)
            assert max(lay.rank_rows) - min(lay.rank_rows) <= 1
    position, trained = consume(lay, lay.steps(batch), batch)
    seen += [x for step in trained for x in step]
    assert sorted(seen) == all_rows(rows)  # none skipped, none twice
    assert plan_pass(position, PATHS, rows, world).remaining_rows == 0


def test_same_size_resume_continues_the_uninterrupted_batches() -> None:
    rows, batch = [1000, 333, 64], 50
    for world in (1, 2, 3):
        lay = plan_pass(None, PATHS, rows, world)
        _, straight = consume(lay, lay.steps(batch), batch)
        for stop in (0, 1, 7, lay.steps(batch) - 1):
            position, head = consume(lay, stop, batch)
            again = plan_pass(position, PATHS, rows, world)
            assert not again.redivided
            _, tail = consume(again, again.steps(batch), batch)
            assert head + tail == straight
            # the resumed run reports its rows under the same keys as the uninterrupted one
            final, _ = consume(again, again.steps(batch), batch)
            want, _ = consume(lay, lay.steps(batch), batch)
            assert final == want


def test_same_size_resume_after_a_redivision_continues_it() -> None:
    """A pass re-divided on 3 processes, stopped and resumed on 3 again, reads the batches the
    re-divided pass would have read (the ranks consumed equal amounts: the even split repeats)."""
    rows, batch = [1000, 333, 64], 50
    position, _ = consume(plan_pass(None, PATHS, rows, 2), 6, batch)
    lay = plan_pass(position, PATHS, rows, 3)
    assert lay.redivided
    _, straight = consume(lay, lay.steps(batch), batch)
    for stop in (1, 4, lay.steps(batch) - 2):
        pos, head = consume(lay, stop, batch)
        again = plan_pass(pos, PATHS, rows, 3)
        _, tail = consume(again, again.steps(batch), batch)
        assert head + tail == straight


def test_the_demo_report_2_to_1() -> None:
    """Two processes stopped mid-file: one process reads the rest of each half, nothing twice."""
    path = "/d/part-000.parquet"
    state = {f"{path}:0": 5375, f"{path}:10000": 15119, EPOCHS_COMPLETED: 0, DATA_WORLD_SIZE: 2}
    lay = plan_pass(state, [path], [20000], 1)
    assert lay.redivided and lay.consumed_rows == 5376 + 5120
    assert [(p.start, p.end) for p in lay.pieces[0]] == [(5376, 10000), (15120, 20000)]
    assert lay.position == {
        f"{path}:0": 5375,
        f"{path}:10000": 15119,
        EPOCHS_COMPLETED: 0,
        DATA_WORLD_SIZE: 1,
    }
    assert "written by 2 process(es); this run has 1" in lay.describe(256)


def test_a_position_of_the_previous_reader_is_understood() -> None:
    """The previous reader wrote no process count and dropped the rows past ``W * (n // W)``:
    the same number of processes continues its ranges where they match; otherwise the rest
    (including the rows it dropped) is re-divided."""
    old = {
        f"{PATHS[0]}:0": 9,
        f"{PATHS[0]}:50": 59,
        f"{PATHS[1]}:0": 4,
        f"{PATHS[1]}:33": 36,
        EPOCHS_COMPLETED: 1,
    }
    assert read_position(old, PATHS, [100, 66, 0], "ck").world_size == 2
    lay = plan_pass(old, PATHS, [100, 66, 0], 2)
    assert not lay.redivided and [(p.file, p.start) for p in lay.pieces[0]] == [(0, 10), (1, 5)]
    lay = plan_pass(old, PATHS, [101, 67, 0], 2)  # ranges of 101 rows on 2: 0-50, 50-101: still match
    assert not lay.redivided
    lay = plan_pass(old, PATHS, [100, 67, 0], 3)
    assert lay.redivided and lay.remaining_rows == 167 - 10 - 10 - 5 - 4


def test_positions_that_cannot_be_accounted_for_are_refused() -> None:
    rows = [100, 10, 0]
    with pytest.raises(ConfigError, match=r"ck: the saved data position names \['/e/a.parquet:0'\]"):
        read_position({"/e/a.parquet:0": 3}, PATHS, rows, "ck")
    with pytest.raises(ConfigError, match=r"lies outside /d/b\.parquet, which has 10 rows now"):
        read_position({f"{PATHS[1]}:0": 10}, PATHS, rows, "ck")
    with pytest.raises(ConfigError, match="does not end in a row number"):
        read_position({f"{PATHS[1]}:x": 1}, PATHS, rows, "ck")
    with pytest.raises(ConfigError, match="a row number was expected"):
        read_position({f"{PATHS[1]}:0": "1"}, PATHS, rows, "ck")
    with pytest.raises(ConfigError, match="__world_size__ is 0"):
        read_position({DATA_WORLD_SIZE: 0}, PATHS, rows, "ck")
