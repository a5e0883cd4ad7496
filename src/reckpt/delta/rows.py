"""The rows of a delta checkpoint: selecting them from tensors, their file format, applying them.

Per writing rank, ``delta_rows/rank_<R>.json`` indexes ``delta_rows/rank_<R>.bin``. Each
entry is one piece (a local shard, or a whole unsharded tensor) of one state-dict key:

``{"part": "model" | "optimizer", "key": flattened key, "shape": global shape, "dtype": str,
"col_offset": int, "cols": int, "count": n, "encoding": "raw" | "int8" | "fp16",
"ids": [offset, nbytes], "values": [offset, nbytes]}``

``ids`` are little-endian int64 global indices along dimension 0; ``values`` are the rows'
columns ``[col_offset, col_offset + cols)``. Row-indexed optimizer state whose first
dimension is a multiple ``m`` of the table's rows (row-wise momentum of ``m`` column shards)
is selected periodically: row ``r`` is indices ``r, r + rows, ..., r + (m - 1) rows``. Pieces
are applied by global index, so a delta restores at any world size and any plan that keeps
the table's shape.

A save selects :class:`RowSource` s (:func:`row_sources`: where the touched rows are, nothing
copied) and writes them with :mod:`reckpt.delta.row_writer`; :func:`select_rows` and
:func:`encode_pieces` build the same file in memory (the reference the writer is tested against).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from reckpt.delta.quant import decode_rows, encode_rows, encoded_row_bytes
from reckpt.dist import Dist
from reckpt.errors import ConfigError, IntegrityError

__all__ = [
    "RowPiece",
    "RowSource",
    "bytes_view",
    "row_sources",
    "apply_pieces",
    "global_nbytes",
    "decode_index",
    "encode_pieces",
    "local_pieces",
    "select_rows",
]

_DTYPES = {
    str(t).removeprefix("torch."): t for t in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
}
_DTYPES.update({"int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8})
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # bit copies


@dataclass(slots=True)
class RowPiece:
    """Selected rows of one piece of one key."""

    part: str
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    col_offset: int
    cols: int
    ids: torch.Tensor
    values: torch.Tensor
    encoding: str = "raw"


def global_nbytes(t: Any) -> int:
    """Bytes of a tensor's global shape (plain, ShardedTensor or DTensor); 0 for non-tensors."""
    shape, dtype = getattr(t, "shape", None), getattr(t, "dtype", None)
    if shape is None or not isinstance(dtype, torch.dtype):
        return 0
    return math.prod(int(s) for s in shape) * torch.empty((), dtype=dtype).element_size()


def local_pieces(t: Any, d: Dist) -> list[tuple[int, int, torch.Tensor]]:
    """``[(row offset, column offset, local tensor)]`` this rank holds of ``t``.

    ShardedTensor: its local shards. DTensor: its local part (replicated: rank 0 only).
    A plain tensor is taken as replicated: rank 0 only.
    """
    if hasattr(t, "local_shards"):
        out = []
        for s in t.local_shards():
            offs = list(s.metadata.shard_offsets)
            out.append((int(offs[0]), int(offs[1]) if len(offs) > 1 else 0, s.tensor))
        return out
    if hasattr(t, "device_mesh") and hasattr(t, "to_local"):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        if all(p.is_replicate() for p in t.placements) and not d.is_coordinator:
            return []
        _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return [(int(offset[0]), int(offset[1]) if len(offset) > 1 else 0, t.to_local())]
    return [(0, 0, t)] if d.is_coordinator else []


def row_indices(touched: torch.Tensor, table_rows: int, dim0: int) -> torch.Tensor | None:
    """Global indices along dimension 0 of a tensor of ``dim0`` rows for touched table rows.

    ``None`` when the tensor is not row-indexed (a scalar, or ``dim0`` not a multiple).
    """
    if dim0 == 0 or table_rows == 0 or dim0 % table_rows:
        return None
    period = dim0 // table_rows
    return torch.cat([touched + k * table_rows for k in range(period)]) if period > 1 else touched


def select_rows(
    part: str, key: str, t: Any, touched: torch.Tensor, table_rows: int, d: Dist, encoding: str = "raw"
) -> list[RowPiece] | None:
    """This rank's pieces of ``t`` restricted to the touched rows; ``None`` if not row-indexed."""
    shape = tuple(int(s) for s in t.shape)
    if not shape:
        return None
    ids = row_indices(touched, table_rows, shape[0])
    if ids is None:
        return None
    out = []
    for row_off, col_off, local in local_pieces(t, d):
        n = local.shape[0]
        sel = ids[(ids >= row_off) & (ids < row_off + n)]
        values = local.index_select(0, sel - row_off) if sel.numel() else local[:0]
        cols = int(local.shape[1]) if local.dim() > 1 else 0
        out.append(RowPiece(part, key, shape, local.dtype, col_off, cols, sel.clone(), values, encoding))
    return out


@dataclass(slots=True)
class RowSource:
    """The touched rows of one piece of one key, where they live: nothing copied yet.

    Attributes:
        part, key, shape: the entry's ``part``, ``key`` and global ``shape``.
        local: this rank's piece of the tensor.
        row_offset: the piece's first global row.
        col_offset: the piece's first global column.
        ids: global row ids (int64) of the rows to write.
        encoding: the entry's encoding (``"raw"`` for a tensor that is not floating point).
    """

    part: str
    key: str
    shape: tuple[int, ...]
    local: torch.Tensor
    row_offset: int
    col_offset: int
    ids: torch.Tensor
    encoding: str

    @property
    def count(self) -> int:
        return int(self.ids.numel())

    @property
    def cols(self) -> int:
        return int(self.local.shape[1]) if self.local.dim() > 1 else 0

    @property
    def row_elems(self) -> int:
        n = 1
        for s in self.local.shape[1:]:
            n *= int(s)
        return n

    @property
    def row_bytes(self) -> int:
        """Bytes of one row as gathered (the tensor's own dtype)."""
        return self.row_elems * self.local.element_size()

    @property
    def values_nbytes(self) -> int:
        """Bytes of the rows in the file (after encoding)."""
        return self.count * encoded_row_bytes(self.encoding, self.row_elems, self.local.element_size())

    def entry(self, offset: int) -> dict[str, Any]:
        """The index entry of this piece when its ids start at ``offset`` of the data file."""
        ids_nbytes = 8 * self.count
        return {
            "part": self.part,
            "key": self.key,
            "shape": list(self.shape),
            "dtype": str(self.local.dtype).removeprefix("torch."),
            "col_offset": self.col_offset,
            "cols": self.cols,
            "count": self.count,
            "encoding": self.encoding,
            "ids": [offset, ids_nbytes],
            "values": [offset + ids_nbytes, self.values_nbytes],
        }

    def gather(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Copy rows ``ids[start:stop]`` into ``out`` (a uint8 buffer, at an offset aligned for
        the dtype); the rows, viewed in it.

        The copy is numpy's ``take(..., out=)`` on the rows' bits (``index_select`` off the
        CPU): it runs on the calling thread without the GIL, whereas torch's ``index_select``
        spreads the rows over the intra-op threads, which wait for one another whenever other
        threads hold the cores (on two busy cores that made the gather 5x slower).
        """
        n = stop - start
        view = out[: n * self.row_bytes].view(self.local.dtype).view(n, *self.local.shape[1:])
        idx = self.ids[start:stop]
        if self.row_offset:
            idx = torch.from_numpy(idx.numpy() - self.row_offset)
        src = self.local.detach()
        bits = _SAME_SIZE_INT.get(src.element_size())
        if src.device.type != "cpu":
            view.copy_(src.index_select(0, idx.to(src.device)))
        elif bits is not None and type(src) is torch.Tensor and src.layout == torch.strided:
            np.take(src.view(bits).numpy(), idx.numpy(), axis=0, out=view.view(bits).numpy(), mode="clip")
        else:
            torch.index_select(src, 0, idx, out=view)
        return view

    def encoded(self, rows: torch.Tensor) -> memoryview:
        """``rows`` as the file holds them (raw: the buffer itself, no copy)."""
        if self.encoding == "raw":
            return bytes_view(rows)
        return memoryview(encode_rows(rows, self.encoding, f"{self.part}/{self.key}"))


def row_sources(
    part: str, key: str, t: Any, touched: torch.Tensor, table_rows: int, d: Dist, encoding: str = "raw"
) -> list[RowSource] | None:
    """This rank's pieces of ``t`` restricted to the touched rows (nothing copied); ``None`` if
    ``t`` is not row-indexed. The selection of :func:`select_rows`.

    Raises:
        ConfigError: a touched row outside the table (checked here: the copy does not check).
    """
    shape = tuple(int(s) for s in t.shape)
    if not shape:
        return None
    touched = touched.to(device="cpu", dtype=torch.int64).contiguous()
    if touched.numel() and not 0 <= int(touched.numpy().min()) <= int(touched.numpy().max()) < table_rows:
        raise ConfigError(f"{part}/{key}: touched rows outside 0..{table_rows - 1}")
    ids = row_indices(touched, table_rows, shape[0])
    if ids is None:
        return None
    ids = ids.contiguous()
    out = []
    for row_off, col_off, local in local_pieces(t, d):
        n = local.shape[0]
        sel = ids
        if row_off or n < shape[0]:  # a row shard: its own rows (numpy: no intra-op threads)
            every = ids.numpy()
            sel = torch.from_numpy(every[(every >= row_off) & (every < row_off + n)])
        enc = encoding if local.is_floating_point() else "raw"
        out.append(RowSource(part, key, shape, local, row_off, col_off, sel, enc))
    return out


def bytes_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (writable)."""
    if t.numel() == 0:
        return memoryview(b"")
    return t.detach().reshape(-1).view(torch.uint8).numpy().data.cast("B")


def encode_pieces(pieces: list[RowPiece]) -> tuple[bytes, bytes]:
    """``(index JSON, data)`` of one rank's pieces."""
    chunks: list[bytes] = []
    entries = []
    offset = 0
    for p in pieces:
        ids = p.ids.to(torch.int64).contiguous().numpy().tobytes()
        what = f"{p.part}/{p.key}"
        values = encode_rows(p.values, p.encoding if p.values.is_floating_point() else "raw", what)
        entries.append(
            {
                "part": p.part,
                "key": p.key,
                "shape": list(p.shape),
                "dtype": str(p.dtype).removeprefix("torch."),
                "col_offset": p.col_offset,
                "cols": p.cols,
                "count": int(p.ids.numel()),
                "encoding": p.encoding if p.values.is_floating_point() else "raw",
                "ids": [offset, len(ids)],
                "values": [offset + len(ids), len(values)],
            }
        )
        chunks += [ids, values]
        offset += len(ids) + len(values)
    return json.dumps({"entries": entries}).encode("utf-8"), b"".join(chunks)


def decode_index(index: bytes, data: bytes, source: str) -> list[RowPiece]:
    """Parse one rank's index and data; every size is checked before a tensor is built.

    Raises:
        IntegrityError: the index is malformed or points outside ``data`` (``source`` named).
    """
    try:
        entries = json.loads(index.decode("utf-8"))["entries"]
        out = []
        for e in entries:
            (io, ib), (vo, vb) = e["ids"], e["values"]
            count, cols = int(e["count"]), int(e["cols"])
            dtype = _DTYPES[e["dtype"]]
            if (
                min(io, ib, vo, vb, count, cols) < 0
                or io + ib > len(data)
                or vo + vb > len(data)
                or ib != 8 * count
            ):
                raise ValueError(f"entry {e['key']!r} points outside the data file or has a wrong size")
            ids = (
                torch.frombuffer(bytearray(data[io : io + ib]), dtype=torch.int64)
                if count
                else torch.empty(0, dtype=torch.int64)
            )
            row_shape = (count, cols) if cols else (count,)
            values = decode_rows(data[vo : vo + vb], str(e["encoding"]), row_shape, dtype)
            shape = tuple(int(s) for s in e["shape"])
            if count and (int(ids.min()) < 0 or int(ids.max()) >= shape[0]):
                raise ValueError(f"entry {e['key']!r} has row ids outside its shape {shape}")
            out.append(
                RowPiece(
                    str(e["part"]),
                    str(e["key"]),
                    shape,
                    dtype,
                    int(e["col_offset"]),
                    cols,
                    ids,
                    values,
                    str(e["encoding"]),
                )
            )
        return out
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as err:
        raise IntegrityError(f"{source}: malformed delta rows ({err})") from err


def apply_pieces(t: Any, pieces: list[RowPiece], d: Dist) -> int:
    """Write the pieces' rows into this rank's part of ``t`` (in place); returns rows written."""
    written = 0
    targets = local_pieces(t, d) if (hasattr(t, "local_shards") or hasattr(t, "device_mesh")) else [(0, 0, t)]
    for row_off, col_off, local in targets:
        n = local.shape[0]
        ncols = int(local.shape[1]) if local.dim() > 1 else 0
        for p in pieces:
            mask = (p.ids >= row_off) & (p.ids < row_off + n)
            if not bool(mask.any()):
                continue
            rows = p.ids[mask] - row_off
            vals = p.values[mask]
            if ncols:
                c0, c1 = max(col_off, p.col_offset), min(col_off + ncols, p.col_offset + p.cols)
                if c0 >= c1:
                    continue
                local[rows, c0 - col_off : c1 - col_off] = vals[:, c0 - p.col_offset : c1 - p.col_offset].to(
                    local.dtype
                )
            else:
                local[rows] = vals.to(local.dtype)
            written += int(rows.numel())
    return written
