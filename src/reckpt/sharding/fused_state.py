"""Optimizer state whose shape or name depends on the sharding plan, converted between plans.

TorchRec's fused (in-backward) optimizers keep their state per sharded table, and two things
about it change with the plan:

* **Names.** A sharded table's state is ``state.<weight fqn>.<table>.momentum1``; a
  ``data_parallel`` table is trained by an ordinary (dense) optimizer whose state is
  ``state.<weight fqn>.sum`` (Adagrad, TorchRec's ``RowWiseAdagrad``) or ``.exp_avg`` /
  ``.exp_avg_sq`` (Adam). Same-shaped pairs are renamed (:func:`dense_fused_rename_rule`)
  and DCP reshards them like weights.
* **Row-wise state.** Row-wise Adagrad keeps one value per row. A column-wise table is k
  column shards, each a table of its own, so the state is ``k * rows`` values, shard by
  shard in column order (TorchRec's optimizer sharding); a dense ``RowWiseAdagrad`` keeps it
  as ``[rows, 1]``. The per-row value is the running sum of ``mean(grad ** 2)`` over the
  row's columns, so the value of a column range ``[a, b)`` built from shards ``[c_i, d_i)``
  that tile it exactly is ``sum_i (d_i - c_i) / (b - a) * m_i``: column-wise -> table-wise /
  row-wise is exact. The reverse needs each shard's share of the squared gradient, which
  the checkpoint does not hold: such state is re-initialised, and said so. A table that
  changed size loads its overlapping rows (and the column shards the saved width covers)
  shard by shard; the rest keeps its current values, as for any resized key.

:func:`plan_conversions` decides, per current key, what to do;
:func:`reckpt.sharding.fused_fill.fill_conversions` is the collective that reads the checkpoint's state
and writes the converted values in place.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

__all__ = [
    "Splits",
    "RowwiseConversion",
    "column_splits",
    "convert_rowwise",
    "rowwise_parts",
    "dense_fused_rename_rule",
    "plan_conversions",
    "flat_state",
]

Splits = tuple[tuple[int, int], ...]
"""Column ranges ``(start, end)`` of a table's shards, in column order."""

_FUSED_TO_DENSE = {"momentum1": ("sum", "exp_avg"), "momentum2": ("exp_avg_sq",)}
_DENSE_TO_FUSED = {"sum": "momentum1", "exp_avg": "momentum1", "exp_avg_sq": "momentum2"}
_ROWWISE_DENSE = "sum"


def column_splits(boxes: Collection[tuple[tuple[int, ...], tuple[int, ...]]], dim: int) -> Splits | None:
    """Column ranges of a 2-D table's shards, from their ``(offsets, sizes)``.

    Returns ``((0, dim),)`` for a table not split by columns, ``None`` for a grid (split by
    rows and by columns) or a shape that is not 2-D.

    Example:
        >>> column_splits([((0, 0), (4, 8)), ((4, 0), (4, 8))], 8)
        ((0, 8),)
        >>> column_splits([((0, 4), (8, 4)), ((0, 0), (8, 4))], 8)
        ((0, 4), (4, 8))
    """
    if any(len(off) != 2 for off, _ in boxes):
        return None
    cols = sorted({(off[1], off[1] + size[1]) for off, size in boxes})
    if not cols:
        return ((0, dim),)
    if len(cols) > 1 and len({(off[0], size[0]) for off, size in boxes}) > 1:
        return None
    return tuple(cols)


def _saved_splits(md: Metadata, key: str) -> tuple[int, Splits] | None:
    entry = md.state_dict_metadata.get(key)
    if not isinstance(entry, TensorStorageMetadata) or len(entry.size) != 2:
        return None
    boxes = [(tuple(c.offsets), tuple(c.sizes)) for c in entry.chunks]
    splits = column_splits(boxes, entry.size[1])
    return None if splits is None else (int(entry.size[0]), splits)


def _current_splits(weight: Any) -> tuple[int, Splits] | None:
    if isinstance(weight, torch.Tensor) and hasattr(weight, "metadata") and callable(weight.metadata):
        meta = weight.metadata()
        boxes = [(tuple(s.shard_offsets), tuple(s.shard_sizes)) for s in meta.shards_metadata]
        size = tuple(meta.size)
    elif isinstance(weight, torch.Tensor) and type(weight) in (torch.Tensor, torch.nn.Parameter):
        size = tuple(weight.shape)
        boxes = [((0, 0), size)] if len(size) == 2 else []
    else:
        return None
    if len(size) != 2:
        return None
    splits = column_splits(boxes, size[1])
    return None if splits is None else (int(size[0]), splits)


def rowwise_parts(
    src: torch.Tensor, src_rows: int, rows: int, src_splits: Splits, dst_splits: Splits
) -> list[torch.Tensor | None] | None:
    """Each destination column shard's row-wise state, from state laid out for ``src_splits``.

    A destination range ``[a, b)`` takes the part of it the checkpoint covers, ``[a, min(b,
    W))`` with ``W`` the saved width; the source ranges must tile that part exactly, and its
    value is their width-weighted mean (a single source range is copied bit for bit). Only
    the first ``min(rows, src_rows)`` rows come from the checkpoint (a table that changed
    size loads its overlapping rows, shard by shard). Returns, per destination range, those
    rows, or ``None`` for a range wholly beyond the saved width; ``None`` if a source range
    straddles a destination range (lossy).

    Example:
        >>> m = torch.tensor([1.0, 2.0, 3.0, 4.0])  # 2 rows, 2 column shards of width 4
        >>> rowwise_parts(m, 2, 3, ((0, 4), (4, 8)), ((0, 4), (4, 8), (8, 12)))
        [tensor([1., 2.]), tensor([3., 4.]), None]
    """
    if src.numel() != src_rows * len(src_splits):
        return None
    width, n = src_splits[-1][1], min(rows, src_rows)
    out: list[torch.Tensor | None] = []
    for a, full_b in dst_splits:
        b = min(full_b, width)
        if a >= b:
            out.append(None)
            continue
        parts: list[tuple[int, int]] = []
        for i, (c, d) in enumerate(src_splits):
            if a <= c and d <= b:
                parts.append((i, d - c))
            elif c < b and a < d:
                return None
        if sum(w for _, w in parts) != b - a:
            return None
        if len(parts) == 1:
            i = parts[0][0]
            out.append(src[i * src_rows : i * src_rows + n].clone())
            continue
        acc = torch.zeros(n, dtype=src.dtype)
        for i, w in parts:
            acc += src[i * src_rows : i * src_rows + n] * (w / (b - a))
        out.append(acc)
    return out


def convert_rowwise(
    src: torch.Tensor, rows: int, src_splits: Splits, dst_splits: Splits
) -> torch.Tensor | None:
    """Row-wise state laid out for ``src_splits``, recomputed for ``dst_splits``; ``None`` if lossy.

    The same table (rows and width) under another column layout: see :func:`rowwise_parts`.

    Example:
        >>> m = torch.tensor([1.0, 2.0, 3.0, 4.0])  # 2 rows, 2 column shards of width 4
        >>> convert_rowwise(m, 2, ((0, 4), (4, 8)), ((0, 8),))
        tensor([2., 3.])
        >>> convert_rowwise(torch.tensor([1.0, 2.0]), 2, ((0, 8),), ((0, 4), (4, 8))) is None
        True
    """
    parts = rowwise_parts(src, rows, rows, src_splits, dst_splits)
    if parts is None or any(p is None for p in parts):
        return None
    return torch.cat([p for p in parts if p is not None])


def dense_fused_rename_rule(key: str, saved_keys: Collection[str]) -> str | None:
    """Rename rule between a dense optimizer's and a fused optimizer's state of one table.

    ``state.<w>.sum`` <-> ``state.<w>.<table>.momentum1`` (and ``exp_avg`` / ``exp_avg_sq``
    <-> ``momentum1`` / ``momentum2``). Only a same-shaped pair loads; others are handled by
    :func:`plan_conversions` or re-initialised.
    """
    if not key.startswith("state."):
        return None
    head, _, name = key.rpartition(".")
    if name in _DENSE_TO_FUSED:
        prefix = head + "."
        want = "." + _DENSE_TO_FUSED[name]
        for k in saved_keys:
            if k.startswith(prefix) and k.endswith(want) and "." not in k[len(prefix) : -len(want)]:
                return k
    if name in _FUSED_TO_DENSE:
        param, _, _table = head.rpartition(".")
        for dense in _FUSED_TO_DENSE[name]:
            candidate = f"{param}.{dense}"
            if candidate in saved_keys:
                return candidate
    return None


def flat_state(sd: Mapping[str, Any]) -> Iterator[tuple[str, str, str, Any]]:
    """``(flattened key, param fqn, state name, value)`` of a name-keyed optimizer state dict."""
    for fqn, st in (sd.get("state") or {}).items():
        if isinstance(st, Mapping):
            for name, value in st.items():
                yield f"state.{fqn}.{name}", str(fqn), str(name), value


@dataclass(frozen=True, slots=True)
class RowwiseConversion:
    """How one current row-wise state key is filled from the checkpoint.

    Attributes:
        key: the current (flattened) optimizer key.
        fqn: the table's weight; ``name``: the state's name under it.
        source: the checkpoint key read.
        source_shape: its saved shape.
        shape: its current shape.
        rows: the table's row count; ``src_rows``: the saved table's.
        src_splits: the saved column shards (``None``: unknown, so not convertible).
        dst_splits: the current column shards.
    """

    key: str
    fqn: str
    name: str
    source: str
    source_shape: tuple[int, ...]
    shape: tuple[int, ...]
    rows: int
    src_rows: int
    src_splits: Splits | None
    dst_splits: Splits

    @property
    def partial(self) -> bool:
        """The table changed size: only the overlapping rows (and columns) are loaded."""
        wider = self.src_splits is not None and self.dst_splits[-1][1] > self.src_splits[-1][1]
        return self.rows != self.src_rows or wider

    def convert(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(values, loaded)`` over the current flat layout; ``None`` if not convertible.

        ``loaded`` marks the entries that come from the checkpoint; the others keep their
        current values (rows or column shards the saved table did not have).
        """
        if self.src_splits is None:
            return None
        parts = rowwise_parts(src.reshape(-1), self.src_rows, self.rows, self.src_splits, self.dst_splits)
        if parts is None:
            return None
        values = torch.zeros(self.rows * len(self.dst_splits), dtype=src.dtype)
        loaded = torch.zeros(values.shape, dtype=torch.bool)
        for i, part in enumerate(parts):
            if part is not None:
                values[i * self.rows : i * self.rows + len(part)] = part
                loaded[i * self.rows : i * self.rows + len(part)] = True
        return values, loaded

    def describe(self) -> str:
        def fmt(s: Splits | None) -> str:
            if s is None:
                return "unknown column shards"
            return "1 column shard" if len(s) == 1 else f"{len(s)} column shards"

        rows = f", rows 0:{min(self.rows, self.src_rows)} of each shard" if self.partial else ""
        return f"{self.source} ({fmt(self.src_splits)}) -> {self.key} ({fmt(self.dst_splits)}){rows}"


def _rowwise_source(key: str, name: str, fqn: str, saved: Mapping[str, Any], dense: bool) -> str | None:
    if key in saved:
        return key
    if dense:
        prefix, want = f"state.{fqn}.", ".momentum1"
        found = [k for k in saved if k.startswith(prefix) and k.endswith(want)]
        found = [k for k in found if "." not in k[len(prefix) : -len(want)]]
        return found[0] if len(found) == 1 else None
    candidate = f"state.{fqn}.{_ROWWISE_DENSE}"
    return candidate if name.endswith("momentum1") and candidate in saved else None


def plan_conversions(
    optim_sd: Mapping[str, Any],
    model_sd: Mapping[str, Any],
    saved_optim: Metadata,
    saved_model: Metadata | None,
    skip: Collection[str] = (),
    overlap: bool = True,
) -> dict[str, RowwiseConversion]:
    """Current row-wise optimizer keys whose saved layout differs (``key -> conversion``).

    A key is listed when its checkpoint counterpart has another name (dense <-> fused), another
    shape, or the same shape over other column shards (which DCP would load positionally,
    wrongly). Keys in ``skip`` (explicitly mapped by the user) are left alone.

    A table that changed size loads its overlapping rows (``overlap``, the default): one
    column shard on both sides is left to DCP, which loads the first rows positionally, as
    for any resized key; a column-sharded table is converted shard by shard
    (:func:`rowwise_parts`), where DCP's positional overlap of the flat state would mix
    shards. With ``overlap=False`` (``strict_shapes``) such state is not convertible.
    """
    saved = saved_optim.state_dict_metadata
    out: dict[str, RowwiseConversion] = {}
    for key, fqn, name, value in flat_state(optim_sd):
        if key in skip or not isinstance(value, torch.Tensor):
            continue
        sharded = hasattr(value, "local_shards")
        size = tuple(value.size())
        dense = not sharded and name == _ROWWISE_DENSE and len(size) == 2 and size[1] == 1
        if not (dense or (sharded and len(size) == 1)):
            continue
        cur = _current_splits(model_sd.get(fqn))
        if cur is None:
            continue
        rows, dst = cur
        if size[0] * (size[1] if dense else 1) != rows * len(dst):
            continue
        source = _rowwise_source(key, name, fqn, saved, dense)
        if source is None:
            continue
        entry = saved[source]
        if not isinstance(entry, TensorStorageMetadata):
            continue
        got = _saved_splits(saved_model, fqn) if saved_model is not None else None
        src_rows, src_splits = got if got is not None else (rows, None)
        if not overlap and (src_rows != rows or (src_splits and src_splits[-1][1] < dst[-1][1])):
            src_splits = None
        shape = tuple(entry.size)
        if src_splits is not None and shape not in ((src_rows * len(src_splits),), (src_rows, 1)):
            src_splits = None
        if source == key and shape == size and src_splits == dst:
            continue
        if overlap and source == key and src_splits is not None and len(src_splits) == len(dst) == 1:
            continue
        out[key] = RowwiseConversion(key, fqn, name, source, shape, size, rows, src_rows, src_splits, dst)
    return out
