"""Collective half of :mod:`reckpt.sharding.fused_state`: read saved row-wise state, write it converted.

:func:`fill_conversions` (every rank calls it) reads the whole saved tensors the planned
conversions need (:func:`read_sources`), converts them and writes this rank's rows in place
(:func:`write_local`), then reports each key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from reckpt.dist import Dist
from reckpt.report import PartReport, ShapeMismatch
from reckpt.sharding.fused_state import RowwiseConversion, flat_state
from reckpt.storage.core import Storage

__all__ = ["apply_conversions", "fill_conversions", "read_sources", "write_local"]

logger = logging.getLogger(__name__)


def write_local(value: torch.Tensor, full: torch.Tensor, loaded: torch.Tensor | None = None) -> None:
    """Copy the rows this rank holds of ``full`` (the whole state) into ``value``, in place.

    With ``loaded``, only the entries it marks are written; the others keep their values.
    """
    parts = (
        [(s.tensor, s.metadata.shard_offsets[0], s.metadata.shard_sizes[0]) for s in value.local_shards()]
        if hasattr(value, "local_shards")
        else [(value, 0, full.numel())]
    )
    for dst, off, n in parts:
        src = full[off : off + n].view_as(dst)
        dst.copy_(src if loaded is None else torch.where(loaded[off : off + n].view_as(dst), src, dst))


def read_sources(
    wanted: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    storage: Storage,
    dcp_dir: str,
    metadata: Metadata,
    d: Dist,
) -> dict[str, torch.Tensor]:
    """Collective: every rank of ``d`` reads the whole checkpoint tensors it names (may be none)."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    from reckpt.dcp.load import load_part

    out = {k: torch.zeros(shape, dtype=dtype) for k, (shape, dtype) in wanted.items()}
    load_part(
        out,
        storage,
        dcp_dir,
        DefaultLoadPlanner(allow_partial_load=True),
        metadata=metadata,
        dist=d,
        what=f"reading optimizer state to convert from {dcp_dir}",
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
        got = conv.convert(sources[conv.source])
        if got is None:
            lossy.append(conv)
            continue
        full, loaded = got
        write_local(values[key], full, None if bool(loaded.all()) else loaded)
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

    Converted keys are ``loaded`` (and ``remapped`` when renamed; ``resized`` and
    ``shape_mismatched`` when the table changed size, logged); the others are
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
        if c.partial:
            m = ShapeMismatch(c.key, c.source, c.source_shape, c.shape, (min(c.rows, c.src_rows),))
            pr.resized.append(c.key)
            pr.shape_mismatched.append(m)
            logger.warning(
                "%s: table resized, loading the overlap: %s; the rest keeps its current values",
                where,
                c.describe(),
            )
    for c in lossy:
        pr.reinitialized.append(c.key)
        pr.shape_mismatched.append(ShapeMismatch(c.key, c.source, c.source_shape, c.shape))
        why = f"{c.describe()} cannot be converted exactly; re-initialised"
        logger.warning("%s: %s", where, why)
        notes.append(f"optimizer: {why}")
    pr.loaded.sort()
    pr.resized.sort()
    pr.reinitialized.sort()
