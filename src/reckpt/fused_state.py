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
  the checkpoint does not hold: such state is re-initialised, and said so.

:func:`plan_conversions` decides, per current key, what to do; :func:`apply_conversions` is
the collective that reads the checkpoint's state and writes the converted values in place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from reckpt.report import PartReport, ShapeMismatch

__all__ = [
    "fill_conversions",
    "Splits",
    "RowwiseConversion",
    "column_splits",
    "convert_rowwise",
    "dense_fused_rename_rule",
    "plan_conversions",
    "flat_state",
]

logger = logging.getLogger(__name__)

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


def convert_rowwise(
    src: torch.Tensor, rows: int, src_splits: Splits, dst_splits: Splits
) -> torch.Tensor | None:
    """Row-wise state laid out for ``src_splits``, recomputed for ``dst_splits``; ``None`` if lossy.

    Each destination column range must be tiled exactly by source ranges; its value is the
    width-weighted mean of theirs (a single source range is copied bit for bit).

    Example:
        >>> m = torch.tensor([1.0, 2.0, 3.0, 4.0])  # 2 rows, 2 column shards of width 4
        >>> convert_rowwise(m, 2, ((0, 4), (4, 8)), ((0, 8),))
        tensor([2., 3.])
        >>> convert_rowwise(torch.tensor([1.0, 2.0]), 2, ((0, 8),), ((0, 4), (4, 8))) is None
        True
    """
    if src.numel() != rows * len(src_splits):
        return None
    out = []
    for a, b in dst_splits:
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
            out.append(src[i * rows : (i + 1) * rows].clone())
            continue
        acc = torch.zeros(rows, dtype=src.dtype)
        for i, w in parts:
            acc += src[i * rows : (i + 1) * rows] * (w / (b - a))
        out.append(acc)
    return torch.cat(out)


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
        rows: the table's row count.
        src_splits: the saved column shards (``None``: unknown, so not convertible).
        dst_splits: the current column shards.
    """

    key: str
    fqn: str
    name: str
    source: str
    source_shape: tuple[int, ...]
    rows: int
    src_splits: Splits | None
    dst_splits: Splits

    def convert(self, src: torch.Tensor) -> torch.Tensor | None:
        if self.src_splits is None:
            return None
        return convert_rowwise(src.reshape(-1), self.rows, self.src_splits, self.dst_splits)

    def describe(self) -> str:
        def fmt(s: Splits | None) -> str:
            if s is None:
                return "unknown column shards"
            return "1 column shard" if len(s) == 1 else f"{len(s)} column shards"

        return f"{self.source} ({fmt(self.src_splits)}) -> {self.key} ({fmt(self.dst_splits)})"


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
) -> dict[str, RowwiseConversion]:
    """Current row-wise optimizer keys whose saved layout differs (``key -> conversion``).

    A key is listed when its checkpoint counterpart has another name (dense <-> fused), another
    shape, or the same shape over other column shards (which DCP would load positionally,
    wrongly). Keys in ``skip`` (explicitly mapped by the user) are left alone.
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
        src_splits = got[1] if got is not None and got[0] == rows else None
        shape = tuple(entry.size)
        if src_splits is not None and shape not in ((rows * len(src_splits),), (rows, 1)):
            src_splits = None
        if source == key and shape == size and src_splits == dst:
            continue
        out[key] = RowwiseConversion(key, fqn, name, source, shape, rows, src_splits, dst)
    return out


def write_local(value: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the rows this rank holds of ``full`` (the whole state) into ``value``, in place."""
    if hasattr(value, "local_shards"):
        for shard in value.local_shards():
            off, n = shard.metadata.shard_offsets[0], shard.metadata.shard_sizes[0]
            shard.tensor.copy_(full[off : off + n].view_as(shard.tensor))
    else:
        value.copy_(full.view_as(value))


def read_sources(
    wanted: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    storage: Any,
    dcp_dir: str,
    metadata: Metadata,
    d: Any,
    process_group: Any,
) -> dict[str, torch.Tensor]:
    """Collective: every rank reads the whole checkpoint tensors it names (may be none)."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    from reckpt.dcp_io import dcp_call
    from reckpt.dcp_read import SafeReader

    out = {k: torch.zeros(shape, dtype=dtype) for k, (shape, dtype) in wanted.items()}
    dcp_call(
        dcp_load,
        f"reading optimizer state to convert from {dcp_dir}",
        out,
        storage_reader=SafeReader(dcp_dir, storage, metadata),
        planner=DefaultLoadPlanner(allow_partial_load=True),
        process_group=process_group,
        no_dist=not d.active,
    )
    return out


def apply_conversions(
    conversions: Mapping[str, RowwiseConversion],
    optim_sd: Mapping[str, Any],
    sources: Mapping[str, torch.Tensor],
) -> tuple[list[RowwiseConversion], list[RowwiseConversion]]:
    """Write converted state into ``optim_sd`` in place; returns ``(converted, not convertible)``."""
    values = {key: value for key, _, _, value in flat_state(optim_sd)}
    done, lossy = [], []
    for key, conv in sorted(conversions.items()):
        full = conv.convert(sources[conv.source])
        if full is None:
            lossy.append(conv)
            continue
        write_local(values[key], full)
        done.append(conv)
    return done, lossy


def fill_conversions(
    conversions: Mapping[str, RowwiseConversion],
    optim_sd: Mapping[str, Any],
    pr: PartReport,
    saved: Mapping[str, Any],
    read: Callable[[dict[str, Any]], dict[str, torch.Tensor]],
    notes: list[str],
    where: str,
) -> None:
    """Collective: read the sources, write the converted state, report each key.

    Converted keys are ``loaded`` (and ``remapped`` when renamed); the others are
    ``reinitialized`` and ``shape_mismatched``, logged and noted.

    Args:
        conversions: this rank's keys (may be empty; every rank must call).
        optim_sd: the optimizer state dict being loaded (written in place).
        pr: the optimizer part's report.
        saved: the checkpoint's ``optimizer/`` metadata entries (``state_dict_metadata``).
        read: collective reader of whole saved tensors (``{key: (shape, dtype)} -> tensors``).
        notes: the load report's notes.
        where: the optimizer directory, for messages.
    """
    wanted: dict[str, Any] = {}
    for c in conversions.values():
        entry = saved[c.source]
        dtype = entry.properties.dtype if isinstance(entry, TensorStorageMetadata) else torch.float32
        wanted[c.source] = (c.source_shape, dtype)
    done, lossy = apply_conversions(conversions, optim_sd, read(wanted))
    for c in done:
        pr.loaded.append(c.key)
        if c.source != c.key:
            pr.remapped[c.key] = c.source
        notes.append(f"optimizer: converted {c.describe()}")
    for c in lossy:
        pr.reinitialized.append(c.key)
        pr.shape_mismatched.append(ShapeMismatch(c.key, c.source, c.source_shape, None))
        why = f"{c.describe()} cannot be converted exactly; re-initialised"
        logger.warning("%s: %s", where, why)
        notes.append(f"optimizer: {why}")
    pr.loaded.sort()
    pr.reinitialized.sort()
