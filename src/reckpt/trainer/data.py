"""Parquet click logs: a synthetic generator, and a streaming, resumable, rank-sharded reader.

The reader streams each file by row group (``ParquetFile.iter_batches`` over the row groups a
range touches), so memory is bounded by a row group of the configured columns plus a batch,
whatever the size of the data. Which rows each rank reads is decided by
:mod:`reckpt.trainer.shards`: a fresh pass gives every rank a ``1/W`` slice of every file (no
row is dropped); a resume on another number of processes re-divides the rows not consumed yet.
Positions follow TorchEasyRec's ``dataloader_state.json``: ``"<file>:<range start>"`` -> the
last consumed row of that range, plus ``__epochs_completed__`` and ``__world_size__``.

Ranks may hold a few rows more or less than others, so every rank computes the number of
steps of the pass (the most batches any rank has) and pads with stand-in batches after its own
data (one row of no ids, kept out of the loss: no gradient, no id looked up), which keeps the
collective training step in lockstep and every row read exactly once. See ``docs/data.md``.
"""

from __future__ import annotations

import bisect
import glob
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from reckpt.errors import CheckpointNotFoundError, ConfigError
from reckpt.format.dataloader_state import DATA_WORLD_SIZE, EPOCHS_COMPLETED
from reckpt.trainer.config import DataConfig
from reckpt.trainer.shards import Layout, Piece, plan_pass, position_key, read_position

__all__ = ["make_data", "Batch", "ParquetReader", "input_files", "ROW_ID_COLUMN"]

EPOCHS_KEY = EPOCHS_COMPLETED  # TorchEasyRec's key of completed data passes
ROW_ID_COLUMN = "row_id"
"""The demo data's row identity column (read only to audit which rows were trained on)."""


def make_data(
    out_dir: str,
    *,
    rows: int = 200000,
    eval_rows: int = 10000,
    dense: int = 4,
    sparse: int = 3,
    vocab: int = 2000,
    files: int = 2,
    seed: int = 0,
    row_group_size: int = 8192,
    sequence: int = 1,
    max_history: int = 10,
) -> DataConfig:
    """Write a synthetic click log with a planted, learnable signal and Zipf-distributed ids.

    Each sparse feature's ids follow a Zipf law (a few very hot ids, a long tail), as in real
    recommendation traffic; every id carries a hidden weight, and the click probability is
    ``sigmoid(dense . w + sum of id weights + mean of history weights + bias)``. The
    ``sequence`` history columns ``h0``, ``h1`` ... are lists of 0 to ``max_history`` ids (a
    user's recent items, say; some rows have none) whose mean hidden weight enters the logit;
    they are drawn from a generator of their own, so the other feature columns do not depend
    on ``sequence`` (the label does). Every row also gets a ``row_id`` (0 to ``rows - 1`` over
    the train files, in file order; likewise for eval), which training ignores and tests use
    to check that each row is trained exactly once per pass. Returns the matching data config.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    history_rng = np.random.default_rng([seed, 1])
    id_weight = rng.normal(0.0, 1.0, size=(sparse, vocab))
    history_weight = history_rng.normal(0.0, 1.0, size=(sequence, vocab))
    dense_w = rng.normal(0.0, 0.5, size=dense)

    def table(n: int, first_id: int) -> pa.Table:
        cols: dict[str, Any] = {}
        x = rng.normal(size=(n, dense)).astype(np.float32)
        logit = x @ dense_w - 0.5
        for j in range(dense):
            cols[f"d{j}"] = x[:, j]
        for j in range(sparse):
            ids = (rng.zipf(1.2, size=n) - 1) % vocab
            if j == sparse - 1:  # one multi-valued feature: 1-3 ids per row
                lengths = rng.integers(1, 4, size=n)
                flat = (rng.zipf(1.2, size=int(lengths.sum())) - 1) % vocab
                offsets = np.concatenate([[0], np.cumsum(lengths)])
                logit += np.add.reduceat(id_weight[j, flat], offsets[:-1]) / lengths
                cols[f"s{j}"] = pa.ListArray.from_arrays(
                    pa.array(offsets, pa.int32()), pa.array(flat, pa.int64())
                )
            else:
                logit += id_weight[j, ids]
                cols[f"s{j}"] = ids.astype(np.int64)
        for j in range(sequence):
            cols[f"h{j}"], signal = _history(history_rng, history_weight[j], n, max_history)
            logit += signal
        prob = 1.0 / (1.0 + np.exp(-logit))
        cols["label"] = (rng.random(n) < prob).astype(np.float32)
        cols[ROW_ID_COLUMN] = np.arange(first_id, first_id + n, dtype=np.int64)
        return pa.table(cols)

    for split, n in (("train", rows), ("eval", eval_rows)):
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
        parts = files if split == "train" else 1
        for i in range(parts):
            lo, hi = i * n // parts, (i + 1) * n // parts
            pq.write_table(
                table(hi - lo, lo),
                os.path.join(out_dir, split, f"part-{i:03d}.parquet"),
                row_group_size=row_group_size,
            )
    return DataConfig(
        train_input_path=os.path.join(out_dir, "train"),
        eval_input_path=os.path.join(out_dir, "eval"),
        label="label",
        dense_columns=[f"d{j}" for j in range(dense)],
        sparse_columns=[f"s{j}" for j in range(sparse)],
        sequence_columns=[f"h{j}" for j in range(sequence)],
    )


def _history(rng: np.random.Generator, weight: np.ndarray, n: int, longest: int) -> tuple[Any, np.ndarray]:
    """A list<int64> column of ``n`` histories (0 to ``longest`` Zipf ids each) and its logit term
    (the mean weight of a row's ids, 0 for an empty history)."""
    import pyarrow as pa

    lengths = rng.integers(0, longest + 1, size=n)
    flat = (rng.zipf(1.2, size=int(lengths.sum())) - 1) % len(weight)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    sums = np.zeros(n)
    np.add.at(sums, np.repeat(np.arange(n), lengths), weight[flat])
    column = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, pa.int64()))
    return column, sums / np.maximum(lengths, 1)


def input_files(path: str, what: str) -> list[str]:
    """The Parquet files of a file or directory path, sorted.

    Raises:
        CheckpointNotFoundError: nothing there (named with the config key ``what``).
    """
    if not path:
        raise ConfigError(f"{what} is not set")
    files = sorted(glob.glob(os.path.join(path, "*.parquet"))) if os.path.isdir(path) else [path]
    if not files or not all(os.path.isfile(f) for f in files):
        raise CheckpointNotFoundError(f"{what}: no Parquet file at {path}")
    return files


@dataclass(slots=True)
class Batch:
    dense: torch.Tensor
    sparse: Any
    """A TorchRec ``KeyedJaggedTensor``: the sparse columns, then the sequence columns."""
    label: torch.Tensor
    position: dict[str, int]
    """``"<file>:<range start>"`` -> the last row of that range in this batch (several keys
    when the batch spans ranges); empty for a padding batch."""
    row_ids: np.ndarray | None = None
    """The ``row_id`` column of the batch's rows, when the reader was asked for it."""
    padding: bool = field(default=False)
    """A stand-in (one row of no ids, kept out of the loss) that only keeps this rank in step
    with ranks that still have data."""

    @property
    def rows(self) -> int:
        """Data rows in the batch (0 for padding)."""
        return 0 if self.padding else int(self.label.shape[0])


class ParquetReader:
    """Streams this rank's pieces of the data, resumable from (and re-divisible by) a position.

    Args:
        files: Parquet files, read in this order.
        cfg: schema and batch size.
        rank, world_size: this process and how many read the data.
        table_rows: per sparse column, the table size ids are reduced modulo.
        row_ids: also read the ``row_id`` column into :attr:`Batch.row_ids`.

    Raises:
        ConfigError: a configured column is missing from a file, or there are no rows at all.
    """

    def __init__(
        self,
        files: list[str],
        cfg: DataConfig,
        rank: int,
        world_size: int,
        table_rows: dict[str, int],
        *,
        row_ids: bool = False,
    ):
        import pyarrow.parquet as pq

        # Positions are keyed by the real path, so relative and absolute spellings of the same
        # file (a config's "data/train" and the demo's absolute path) name the same position.
        self.files, self.cfg, self.table_rows = [os.path.realpath(f) for f in files], cfg, table_rows
        self.rank, self.world_size = rank, world_size
        self.features = [*cfg.sparse_columns, *cfg.sequence_columns]  # the batches' KJT keys
        self.columns = [cfg.label, *cfg.dense_columns, *self.features]
        if row_ids:
            self.columns.append(ROW_ID_COLUMN)
        self.with_row_ids = row_ids
        self.rows: list[int] = []
        self._group_starts: list[list[int]] = []  # per file, the first row of each row group
        for f in files:
            meta = pq.ParquetFile(f)
            names = set(meta.schema_arrow.names)
            missing = [c for c in self.columns if c not in names]
            if missing:
                hint = (
                    f" ({ROW_ID_COLUMN} is read to log trained rows; data from `reckpt make-data` has it)"
                    if missing == [ROW_ID_COLUMN]
                    else " named in [data]"
                )
                raise ConfigError(
                    f"{f}: column(s) {missing}{hint} are not in the file; it has {sorted(names)}"
                )
            md = meta.metadata
            starts = [0]
            for g in range(md.num_row_groups):
                starts.append(starts[-1] + md.row_group(g).num_rows)
            self._group_starts.append(starts[:-1])
            self.rows.append(md.num_rows)
        if sum(self.rows) == 0:
            raise ConfigError(f"{', '.join(files)}: no rows to read (empty Parquet)")

    def adopt(self, position: dict[str, Any], source: str) -> dict[str, Any]:
        """A saved data position in this reader's keys; refuses one it cannot account for.

        Keys are matched by the file's real path (a relative key is taken relative to the
        working directory). Every ``"<file>:<range start>"`` key must name one of this run's
        files, and its range start and last row must lie inside that file; the number of
        processes may differ (:meth:`plan` re-divides the rest).

        Raises:
            ConfigError: a key names another file, or a row its file does not have (``source``
                names the checkpoint in the message).
        """
        out: dict[str, Any] = {}
        for key, value in position.items():
            file, sep, start = key.rpartition(":")
            out[f"{os.path.realpath(file)}:{start}" if sep else key] = value
        read_position(out, self.files, self.rows, source)  # raises on what it cannot match
        return out

    def plan(self, position: dict[str, Any] | None = None, source: str = "the data position") -> Layout:
        """Every rank's share of the rest of the pass ``position`` is in (all of it when ``None``)."""
        return plan_pass(position, self.files, self.rows, self.world_size, source)

    def fresh_position(self, epochs_completed: int) -> dict[str, Any]:
        """The position at the start of a pass (nothing consumed)."""
        return {EPOCHS_KEY: epochs_completed, DATA_WORLD_SIZE: self.world_size}

    def batches(self, position: dict[str, Any] | Layout | None = None) -> Iterator[Batch]:
        """This rank's batches after ``position`` (or of a planned :class:`Layout`), then padding.

        Every rank yields the same number of batches (collective: with several processes
        the ranks first check that they planned the same pass).
        """
        layout = position if isinstance(position, Layout) else self.plan(position)
        steps = layout.steps(self.cfg.batch_size)
        self._agree(layout, steps)
        n = 0
        for batch in self._real_batches(layout.pieces[self.rank]):
            n += 1
            yield batch
        for _ in range(steps - n):
            yield self._padding()

    def _agree(self, layout: Layout, steps: int) -> None:
        """Fail loudly (instead of hanging in a later collective) when ranks planned differently."""
        import torch.distributed as dist

        if self.world_size == 1 or not dist.is_initialized():
            return
        fingerprint = zlib.crc32(repr((self.rows, layout.rank_rows)).encode()) & 0x7FFFFFFF
        t = torch.tensor([steps, -steps, fingerprint, -fingerprint], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if int(t[0]) != -int(t[1]) or int(t[2]) != -int(t[3]):
            raise ConfigError(
                f"rank {self.rank}: the processes see different training data ({len(self.files)} file(s),"
                f" {sum(self.rows)} rows here, {steps} steps planned here, up to {int(t[0])} on another"
                " rank); every process must read the same files (the same input path, on shared storage)"
            )

    def _segments(self, pieces: tuple[Piece, ...]) -> Iterator[tuple[str, int, Any]]:
        """``(position key, first row, record batch)`` of every piece, in order, row group by row group."""
        import pyarrow.parquet as pq

        open_file: Any = None
        open_index = -1
        try:
            for p in pieces:
                if p.file != open_index:
                    if open_file is not None:
                        open_file.close()
                    open_file, open_index = pq.ParquetFile(self.files[p.file]), p.file
                starts = self._group_starts[p.file]
                first = bisect.bisect_right(starts, p.start) - 1
                last = bisect.bisect_left(starts, p.end) - 1
                row = starts[first]
                key = position_key(self.files[p.file], p.key_start)
                for rb in open_file.iter_batches(
                    batch_size=self.cfg.batch_size,
                    row_groups=list(range(first, last + 1)),
                    columns=self.columns,
                    use_threads=False,
                ):
                    lo, hi = max(p.start - row, 0), min(p.end - row, rb.num_rows)
                    if hi > lo:
                        yield key, row + lo, rb.slice(lo, hi - lo)
                    row += rb.num_rows
                    if row >= p.end:
                        break
        finally:
            if open_file is not None:
                open_file.close()

    def _real_batches(self, pieces: tuple[Piece, ...]) -> Iterator[Batch]:
        """Full batches of ``batch_size`` rows across piece boundaries; the last may be short."""
        size = self.cfg.batch_size
        buf: list[tuple[str, int, Any]] = []
        held = 0
        for key, first, rb in self._segments(pieces):
            while rb.num_rows:
                take = min(size - held, rb.num_rows)
                buf.append((key, first, rb.slice(0, take)))
                held += take
                rb, first = rb.slice(take), first + take
                if held == size:
                    yield self._batch(buf)
                    buf, held = [], 0
        if buf:
            yield self._batch(buf)

    def _batch(self, parts: list[tuple[str, int, Any]]) -> Batch:
        from torchrec import KeyedJaggedTensor

        cfg = self.cfg
        position: dict[str, int] = {}
        for key, first, rb in parts:
            position[key] = max(position.get(key, -1), first + rb.num_rows - 1)
        rbs = [rb for _, _, rb in parts]

        def column(name: str) -> np.ndarray:
            return np.concatenate([rb.column(name).to_numpy(zero_copy_only=False) for rb in rbs])

        label = torch.from_numpy(column(cfg.label).astype(np.float32))
        dense = (
            torch.from_numpy(np.stack([column(c).astype(np.float32) for c in cfg.dense_columns], 1))
            if cfg.dense_columns
            else torch.zeros(label.shape[0], 0)
        )
        values, lengths = [], []
        for c in self.features:
            for rb in rbs:
                col = rb.column(c)
                if hasattr(col, "flatten"):  # list<int64>: multi-valued
                    ids = col.flatten().to_numpy()
                    lens = np.diff(col.offsets.to_numpy())
                else:
                    ids = col.to_numpy()
                    lens = np.ones(len(ids), dtype=np.int64)
                values.append(torch.from_numpy(ids.astype(np.int64) % self.table_rows[c]))
                lengths.append(torch.from_numpy(lens.astype(np.int32)))
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=list(self.features), values=torch.cat(values), lengths=torch.cat(lengths)
        )
        row_ids = column(ROW_ID_COLUMN).astype(np.int64) if self.with_row_ids else None
        return Batch(dense, kjt, label, position, row_ids)

    def _padding(self) -> Batch:
        """A stand-in batch: one row of no ids and zero dense features, which the trainer keeps
        out of the loss. The model runs (its collectives with it) and learns nothing; no id is
        looked up. (One row, not none: TorchRec cannot split a KeyedJaggedTensor of no rows.)"""
        from torchrec import KeyedJaggedTensor

        cfg = self.cfg
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=list(self.features),
            values=torch.zeros(0, dtype=torch.int64),
            lengths=torch.zeros(len(self.features), dtype=torch.int32),
        )
        no_ids = np.zeros(0, dtype=np.int64) if self.with_row_ids else None
        dense = torch.zeros(1, len(cfg.dense_columns))
        return Batch(dense, kjt, torch.zeros(1), {}, no_ids, padding=True)
