"""How a delta's rows are written: one copy into reused buffers, streamed or frozen, and async deltas.

The rows file must stay byte for byte what the in-memory encoder
(:func:`reckpt.delta.rows.encode_pieces` of :func:`reckpt.delta.rows.select_rows`) makes, so
that the chain restore reads it unchanged; these tests compare the two, then check the
buffers' reuse, the frozen snapshot, failures in the writer thread and the manager's
asynchronous deltas.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import reckpt
from reckpt.delta import row_writer
from reckpt.delta.row_tracker import RowTracker
from reckpt.delta.row_writer import DeltaRows, RowBuffers
from reckpt.delta.rows import RowPiece, RowSource, encode_pieces, row_sources, select_rows
from reckpt.delta.save import save_delta
from reckpt.dist import Dist
from reckpt.errors import ConfigError
from reckpt.format.integrity import checksum_bytes
from reckpt.optim import optimizer_state_dict
from reckpt.storage.core import storage_for
from tests.helpers import TinyRec, state_dicts_equal, train
from tests.helpers.models import adagrad, flat_training_state

TABLE = "emb.user.weight"


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "w": torch.randn(200, 8, generator=g),
        "momentum": torch.rand(200, generator=g),
        "half": torch.randn(200, 4, generator=g).to(torch.bfloat16),
        "ints": torch.randint(0, 1 << 40, (200, 2), generator=g),
        "wide": torch.randn(200, 3, 5, generator=g),
    }


class _Shard:
    def __init__(self, tensor: torch.Tensor, offsets: list[int]) -> None:
        self.tensor = tensor
        self.metadata = SimpleNamespace(shard_offsets=offsets)


class _RowSharded:
    """What local_pieces reads of a row-wise ShardedTensor: its global shape and local shards."""

    def __init__(self, whole: torch.Tensor, cuts: list[int]) -> None:
        self.shape = whole.shape
        self.dtype = whole.dtype
        bounds = [*cuts, whole.shape[0]]
        self._shards = [_Shard(whole[a:b], [a, 0]) for a, b in itertools.pairwise(bounds)]

    def local_shards(self) -> list[_Shard]:
        return self._shards


def _cases(encoding: str) -> tuple[list[RowSource], list[RowPiece]]:
    """The same rows as sources (new writer) and as pieces (the in-memory encoder)."""
    d = Dist(None)
    touched = torch.randperm(200, generator=torch.Generator().manual_seed(5))[:37].sort().values
    sources: list[RowSource] = []
    pieces: list[RowPiece] = []
    for key, t in _tensors().items():
        enc = encoding if key in ("w", "half") else "raw"
        sources += row_sources("model", key, t, touched, 200, d, enc) or []
        pieces += select_rows("model", key, t, touched, 200, d, enc) or []
    # Row-wise shards of one table, all local (offsets 0, 70 and 150).
    sharded = _RowSharded(torch.randn(200, 3, generator=torch.Generator().manual_seed(6)), [0, 70, 150])
    sources += row_sources("model", "rw", sharded, touched, 200, d, encoding) or []
    pieces += select_rows("model", "rw", sharded, touched, 200, d, encoding) or []
    # A row shard (rows 100-199 of a 200-row table) built by hand.
    whole = torch.randn(200, 6, generator=torch.Generator().manual_seed(7))
    local, sel = whole[100:], touched[touched >= 100]
    sources.append(RowSource("optimizer", "state.shard.sum", (200, 6), local, 100, 0, sel, "raw"))
    pieces.append(
        RowPiece("optimizer", "state.shard.sum", (200, 6), local.dtype, 0, 6, sel, local[sel - 100], "raw")
    )
    # No touched row in this piece.
    empty = torch.empty(0, dtype=torch.int64)
    sources.append(RowSource("model", "none", (200, 6), whole, 0, 0, empty, "raw"))
    pieces.append(RowPiece("model", "none", (200, 6), whole.dtype, 0, 6, empty, whole[:0], "raw"))
    return sources, pieces


def _write(rows: DeltaRows, root: str) -> tuple[bytes, bytes, dict[str, Any]]:
    storage = storage_for(root)
    records = rows.write(storage, root, "delta_rows/rank_0")
    data = storage.read_bytes(f"{root}/delta_rows/rank_0.bin")
    index = storage.read_bytes(f"{root}/delta_rows/rank_0.json")
    return data, index, records


@pytest.mark.parametrize("encoding", ["raw", "int8", "fp16"])
@pytest.mark.parametrize("mode", ["streamed", "small chunks", "frozen"])
def test_rows_file_is_byte_identical_to_the_in_memory_encoding(root: str, encoding: str, mode: str) -> None:
    sources, pieces = _cases(encoding)
    want_index, want_data = encode_pieces(pieces)
    buffers = RowBuffers(stage_bytes=64 if mode == "small chunks" else row_writer.STAGE_BYTES)
    rows = DeltaRows(sources, buffers)
    assert rows.index == want_index and rows.nbytes == len(want_data)
    if mode == "frozen":
        rows.freeze()
    data, index, records = _write(rows, root)
    assert data == want_data and index == want_index
    rec = records["delta_rows/rank_0.bin"]
    assert (rec.size, rec.checksum) == (len(want_data), checksum_bytes(want_data))


def _tiny(rows: int = 300) -> tuple[TinyRec, torch.optim.Optimizer, RowTracker]:
    torch.manual_seed(0)
    m = TinyRec(rows=rows)
    o = adagrad(m)
    return m, o, RowTracker(m, tables=[TABLE])


def _reference(m: TinyRec, o: torch.optim.Optimizer, tracker: RowTracker) -> bytes:
    """The rows file the in-memory encoder makes of the model's current state."""
    touched = tracker.touched()[TABLE]
    d = Dist(None)
    pieces = select_rows("model", TABLE, m.state_dict()[TABLE], touched, 300, d) or []
    state = optimizer_state_dict(m, o)["state"][TABLE]
    for leaf, value in state.items():
        pieces += select_rows("optimizer", f"state.{TABLE}.{leaf}", value, touched, 300, d) or []
    return encode_pieces(pieces)[1]


def test_deltas_reuse_the_trackers_buffers_and_write_what_the_old_path_wrote(tmp_path: Path) -> None:
    m, o, tracker = _tiny()
    tracker.buffers = RowBuffers(stage_bytes=128)  # several chunks per piece
    train(m, o, steps=2, seed=1)
    parent = reckpt.save_model(str(tmp_path / "model.ckpt-1"), m, o)
    tracker.clear()
    staging: list[int] = []
    for step in (2, 3):
        train(m, o, steps=2, seed=step)
        want = _reference(m, o, tracker)
        path = str(tmp_path / f"model.delta-{step}")
        save_delta(path, m, o, tracker, parent)
        assert (tmp_path / f"model.delta-{step}" / "delta_rows" / "rank_0.bin").read_bytes() == want
        staging.append(tracker.buffers.staging(0)[0].data_ptr())
        tracker.clear()
        parent = path
    assert staging[0] == staging[1]  # the same memory, refilled
    want_state = flat_training_state(m, o)
    torch.manual_seed(5)
    m2 = TinyRec(rows=300)
    o2 = adagrad(m2)
    reckpt.restore_model(parent, m2, o2)
    assert state_dicts_equal(flat_training_state(m2, o2), want_state)


def test_frozen_rows_are_the_rows_at_the_freeze() -> None:
    t = torch.randn(50, 4)
    ids = torch.tensor([1, 7, 30, 49])
    rows = DeltaRows(row_sources("model", "t", t, ids, 50, Dist(None)) or [], RowBuffers())
    want = encode_pieces(select_rows("model", "t", t, ids, 50, Dist(None)) or [])[1]
    rows.freeze()
    arena = rows.buffers.arena(0).data_ptr()
    t.mul_(-1)  # training goes on
    data, _, _ = _write(rows, "memory://frozen")
    assert data == want
    rows.freeze()  # the next delta refills the same arena
    assert rows.buffers.arena(0).data_ptr() == arena


class _FailingWriter(row_writer.HashingWriter):
    """Fails write number ``fail_at`` into a rows file, as a full disk would."""

    fail_at = 1

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.writes = 0

    def write(self, b: Any) -> int:
        self.writes += 1
        if self.writes == self.fail_at:
            raise OSError(28, "No space left on device")
        return super().write(b)


def test_a_failing_rows_write_fails_the_delta_and_stops_its_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m, o, tracker = _tiny()
    tracker.buffers = RowBuffers(stage_bytes=128)
    parent = reckpt.save_model(str(tmp_path / "model.ckpt-1"), m, o)
    train(m, o, steps=2, seed=1)
    monkeypatch.setattr(_FailingWriter, "fail_at", 3)  # in the writer thread, after two buffers
    monkeypatch.setattr(row_writer, "HashingWriter", _FailingWriter)
    with pytest.raises(Exception, match="No space left on device"):
        save_delta(str(tmp_path / "model.delta-2"), m, o, tracker, parent)
    assert not (tmp_path / "model.delta-2").exists()
    # the conftest fails the test if the writer thread is still alive


def test_an_encoding_error_while_gathering_fails_the_delta_cleanly(tmp_path: Path) -> None:
    m, o, tracker = _tiny()
    tracker.buffers = RowBuffers(stage_bytes=128)
    parent = reckpt.save_model(str(tmp_path / "model.ckpt-1"), m, o)
    train(m, o, steps=2, seed=1)
    touched = tracker.touched()[TABLE]
    with torch.no_grad():
        m.emb["user"].weight[touched[-1]] = float("nan")
    with pytest.raises(Exception, match="NaN"):
        save_delta(str(tmp_path / "model.delta-2"), m, o, tracker, parent, encoding="int8")
    assert not (tmp_path / "model.delta-2").exists()


def _sidecar(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((path / "reckpt.metrics.sidecar.json").read_text())["payload"]
    return doc


@pytest.mark.parametrize("snapshot", ["copy", "fork"])
def test_async_deltas_commit_in_the_background_with_the_state_of_the_call(
    tmp_path: Path, snapshot: str
) -> None:
    root = tmp_path / "run"
    policy = reckpt.delta.IncrementalPolicy(full_every=3, tables=(TABLE,))
    m, o, _ = _tiny()
    states: dict[int, dict[str, Any]] = {}
    paths = []
    with reckpt.CheckpointManager(
        str(root), async_save=True, async_snapshot=snapshot, incremental=policy
    ) as mgr:
        for step in range(1, 6):
            train(m, o, steps=1, seed=step)
            states[step] = {k: v.clone() for k, v in flat_training_state(m, o).items()}
            paths.append(Path(mgr.save(step, m, o)).name)
            train(m, o, steps=1, seed=100 + step)  # in place, while the save may still be written
    assert paths == ["model.ckpt-1", "model.delta-2", "model.delta-3", "model.delta-4", "model.ckpt-5"]
    for name in paths[1:4]:
        assert _sidecar(root / name)["save"]["async"] is True
    # model.delta-4 holds the state at the call of step 4, not what was trained after it.
    torch.manual_seed(9)
    m2 = TinyRec(rows=300)
    o2 = adagrad(m2)
    reckpt.restore_model(str(root / "model.delta-4"), m2, o2)
    assert state_dicts_equal(flat_training_state(m2, o2), states[4])


def test_a_failed_async_delta_makes_the_next_save_a_full_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "run"
    policy = reckpt.delta.IncrementalPolicy(full_every=10, tables=(TABLE,))
    m, o, _ = _tiny()
    with reckpt.CheckpointManager(str(root), async_save=True, incremental=policy) as mgr:
        train(m, o, steps=1, seed=1)
        assert Path(mgr.save(1, m, o)).name == "model.ckpt-1"
        train(m, o, steps=1, seed=2)
        with monkeypatch.context() as patch:
            patch.setattr(row_writer, "HashingWriter", _FailingWriter)
            assert Path(mgr.save(2, m, o)).name == "model.delta-2"  # staged; fails in the background
            with pytest.raises(Exception, match="No space left on device"):
                mgr.wait()
        train(m, o, steps=1, seed=3)
        assert Path(mgr.save(3, m, o)).name == "model.ckpt-3"  # not a delta on model.delta-2
        train(m, o, steps=1, seed=4)
        assert Path(mgr.save(4, m, o)).name == "model.delta-4"
        want = flat_training_state(m, o)
    assert not (root / "model.delta-2").exists()
    torch.manual_seed(9)
    m2 = TinyRec(rows=300)
    o2 = adagrad(m2)
    reckpt.restore_model(str(root / "model.delta-4"), m2, o2)
    assert state_dicts_equal(flat_training_state(m2, o2), want)


def test_touched_rows_outside_the_table_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    m, o, tracker = _tiny()
    parent = reckpt.save_model(str(tmp_path / "model.ckpt-1"), m, o)
    with pytest.raises(ConfigError, match=r"emb\.user\.weight: touched rows outside 0\.\.299"):
        save_delta(
            str(tmp_path / "model.delta-2"), m, o, tracker, parent, touched={TABLE: torch.tensor([3, 300])}
        )
    assert not (tmp_path / "model.delta-2").exists()
