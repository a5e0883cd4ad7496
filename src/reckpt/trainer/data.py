"""Parquet click logs: a synthetic generator, and a resumable, rank-partitioned reader.

Reader positions follow TorchEasyRec's ``dataloader_state.json`` keys: ``"<file>:<range_start>"``
-> the last consumed absolute row of that rank's row range of that file, plus
``__epochs_completed__``. Each rank reads a contiguous range of every file, so positions of
all ranks merge (key-wise max) without conflict; resuming needs the same world size.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from reckpt.errors import CheckpointNotFoundError, ConfigError
from reckpt.format.dataloader_state import EPOCHS_COMPLETED
from reckpt.trainer.config import DataConfig

__all__ = ["make_data", "Batch", "ParquetReader", "input_files"]

EPOCHS_KEY = EPOCHS_COMPLETED  # TorchEasyRec's key of completed data passes


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
) -> DataConfig:
    """Write a synthetic click log with a planted, learnable signal and Zipf-distributed ids.

    Each sparse feature's ids follow a Zipf law (a few very hot ids, a long tail), as in real
    recommendation traffic; every id carries a hidden weight, and the click probability is
    ``sigmoid(dense . w + sum of id weights + bias)``. Returns the matching data config.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    id_weight = rng.normal(0.0, 1.0, size=(sparse, vocab))
    dense_w = rng.normal(0.0, 0.5, size=dense)

    def table(n: int) -> pa.Table:
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
        prob = 1.0 / (1.0 + np.exp(-logit))
        cols["label"] = (rng.random(n) < prob).astype(np.float32)
        return pa.table(cols)

    for split, n in (("train", rows), ("eval", eval_rows)):
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
        parts = files if split == "train" else 1
        for i in range(parts):
            lo, hi = i * n // parts, (i + 1) * n // parts
            pq.write_table(
                table(hi - lo), os.path.join(out_dir, split, f"part-{i:03d}.parquet"), row_group_size=8192
            )
    return DataConfig(
        train_input_path=os.path.join(out_dir, "train"),
        eval_input_path=os.path.join(out_dir, "eval"),
        label="label",
        dense_columns=[f"d{j}" for j in range(dense)],
        sparse_columns=[f"s{j}" for j in range(sparse)],
    )


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
    sparse: Any  # a torchrec KeyedJaggedTensor
    label: torch.Tensor
    position: dict[str, int]  # "<file>:<range_start>" -> last absolute row of this batch


class ParquetReader:
    """Reads this rank's row range of every file, in order, resumable from a position dict.

    Args:
        files: Parquet files.
        cfg: schema and batch size.
        rank, world_size: this process's slice: rows ``[k*p, (k+1)*p)`` of each file, ``p = n // W``.
        table_rows: per sparse column, the table size ids are reduced modulo.
    """

    def __init__(
        self, files: list[str], cfg: DataConfig, rank: int, world_size: int, table_rows: dict[str, int]
    ):
        import pyarrow.parquet as pq

        # Positions are keyed by the real path, so relative and absolute spellings of the same
        # file (a config's "data/train" and the demo's absolute path) name the same position.
        self.files, self.cfg, self.table_rows = [os.path.realpath(f) for f in files], cfg, table_rows
        self.world_size = world_size
        self.ranges: list[tuple[int, int]] = []
        self._per: list[int] = []
        needed = [cfg.label, *cfg.dense_columns, *cfg.sparse_columns]
        for f in files:
            meta = pq.ParquetFile(f)
            names = set(meta.schema_arrow.names)
            missing = [c for c in needed if c not in names]
            if missing:
                raise ConfigError(
                    f"{f}: column(s) {missing} named in [data] are not in the file; it has {sorted(names)}"
                )
            # Equal-length ranges (up to world_size - 1 trailing rows of a file are dropped),
            # so every rank runs the same number of batches: DMP's collectives stay in lockstep.
            per = meta.metadata.num_rows // world_size
            self.ranges.append((rank * per, (rank + 1) * per))
            self._per.append(per)
        if sum(hi - lo for lo, hi in self.ranges) == 0:
            raise ConfigError(
                f"{', '.join(files)}: no rows to read for rank {rank} of {world_size} (empty Parquet)"
            )

    def key(self, i: int) -> str:
        return f"{self.files[i]}:{self.ranges[i][0]}"

    def adopt(self, position: dict[str, Any], source: str) -> dict[str, Any]:
        """A saved data position in this reader's keys; refuses one it cannot match.

        Keys are matched by the file's real path (a relative key is taken relative to the
        working directory). Every ``"<file>:<range start>"`` key must be one of the keys this
        run's ranks use (same files, same number of processes): otherwise resuming would
        re-read or skip data without a word.

        Raises:
            ConfigError: a key names another file or another row range (``source`` names the
                checkpoint in the message).
        """
        ours = {
            f"{f}:{r * per}"
            for f, per in zip(self.files, self._per, strict=True)
            for r in range(self.world_size)
        }
        out: dict[str, Any] = {}
        unmatched = []
        for key, value in position.items():
            if key.startswith("__"):
                out[key] = value
                continue
            file, sep, start = key.rpartition(":")
            mine = f"{os.path.realpath(file)}:{start}" if sep else key
            if mine not in ours:
                unmatched.append(key)
            out[mine] = value
        if unmatched:
            raise ConfigError(
                f"{source}: the saved data position names {sorted(unmatched)[:3]}, which this run does not"
                f" read ({len(self.files)} file(s) in {os.path.dirname(self.files[0])}, {self.world_size}"
                " process(es)); resuming would re-read or skip data. Resume with the same input paths and"
                " number of processes, or start a new model_dir with --fine-tune-checkpoint (weights"
                " only, the data pass restarts)"
            )
        return out

    def batches(self, position: dict[str, Any] | None = None) -> Iterator[Batch]:
        """Batches after ``position`` (exclusive), to the end of this rank's data."""
        import pyarrow.parquet as pq

        cfg = self.cfg
        position = position or {}
        columns = [cfg.label, *cfg.dense_columns, *cfg.sparse_columns]
        for i, f in enumerate(self.files):
            lo, hi = self.ranges[i]
            start = max(lo, int(position.get(self.key(i), lo - 1)) + 1)
            if start >= hi:
                continue
            table = pq.read_table(f, columns=columns).slice(start, hi - start)
            for off in range(0, table.num_rows, cfg.batch_size):
                chunk = table.slice(off, cfg.batch_size)
                yield self._batch(chunk, {self.key(i): start + off + chunk.num_rows - 1})

    def _batch(self, chunk: Any, position: dict[str, int]) -> Batch:
        from torchrec import KeyedJaggedTensor

        cfg = self.cfg
        label = torch.from_numpy(chunk.column(cfg.label).to_numpy(zero_copy_only=False).astype(np.float32))
        dense = (
            torch.from_numpy(
                np.stack([chunk.column(c).to_numpy().astype(np.float32) for c in cfg.dense_columns], 1)
            )
            if cfg.dense_columns
            else torch.zeros(chunk.num_rows, 0)
        )
        values, lengths = [], []
        for c in cfg.sparse_columns:
            col = chunk.column(c).combine_chunks()
            if hasattr(col, "flatten"):  # list<int64>: multi-valued
                ids = col.flatten().to_numpy()
                lens = np.diff(col.offsets.to_numpy())
            else:
                ids = col.to_numpy()
                lens = np.ones(len(ids), dtype=np.int64)
            values.append(torch.from_numpy(ids.astype(np.int64) % self.table_rows[c]))
            lengths.append(torch.from_numpy(lens.astype(np.int32)))
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=list(cfg.sparse_columns), values=torch.cat(values), lengths=torch.cat(lengths)
        )
        return Batch(dense, kjt, label, position)


def steps_per_epoch(reader: ParquetReader, batch_size: int) -> int:
    return sum(math.ceil((hi - lo) / batch_size) for lo, hi in reader.ranges)
