"""Incremental (delta) checkpoints: only the embedding rows that changed, plus the dense part.

A delta ``<model_dir>/model.delta-<step>/`` holds, for every tracked table, the rows touched
since the previous link (weights and row-indexed optimizer state, ``delta_rows/``), the
touched rows of dynamic tables (``dynamicemb/``, upserts and removals), and everything else
in full: the rest of the model, the rest of the optimizer, extra state, dataloader state.
Its manifest names its chain (``{"base", "parent", "chain"}``). The name never matches
``model.ckpt-*``, so TorchEasyRec never loads a delta as a partial model. Restoring one is
:mod:`reckpt.restore.chain`'s job. Raw deltas are lossless; int8/fp16 deltas
(``encoding``) are serving dumps.

The touched rows are copied once, into buffers the tracker keeps from one delta to the next
(:mod:`reckpt.delta.row_writer`): a synchronous delta writes each chunk while the next is
gathered; an asynchronous one (the manager's ``async_save``) gathers them all while the
caller waits and writes them in the background, like the rest of the checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from reckpt.commit.state import checkpoint_state
from reckpt.delta.quant import ENCODINGS
from reckpt.delta.row_tracker import RowTracker
from reckpt.delta.row_writer import DeltaRows
from reckpt.delta.rows import RowSource, row_sources
from reckpt.dist import Dist
from reckpt.errors import (
    CheckpointNotFoundError,
    ConfigError,
    StepAlreadyExistsError,
)
from reckpt.format.integrity import FileRecord
from reckpt.format.manifest import chain_names, read_manifest
from reckpt.format.records import FileWriter
from reckpt.naming import (
    DELTA_ROWS_DIR,
    MODEL_DIR,
    OPTIMIZER_DIR,
    basename,
    checkpoint_name,
    parse_delta_step,
)
from reckpt.save.contents import CheckpointWrite, Part
from reckpt.save.engine import save_checkpoint
from reckpt.storage.core import Storage, storage_for

__all__ = ["save_delta", "save_delta_in"]

logger = logging.getLogger(__name__)


def _split_rows(
    parts: list[Part],
    tracker: RowTracker,
    touched: Mapping[str, torch.Tensor],
    d: Dist,
    encoding: str,
) -> list[RowSource]:
    """Move the tracked tables out of ``parts`` (in place); their touched rows, not yet copied."""
    sources: list[RowSource] = []
    for part, sd in parts:
        for key, table in tracker.tables.items():
            ids = touched[key]
            if part == MODEL_DIR and key in sd:
                got = row_sources(MODEL_DIR, key, sd.pop(key), ids, table.num_rows, d, encoding)
                sources += got or []
            elif part == OPTIMIZER_DIR and isinstance(sd.get("state", {}).get(key), dict):
                # state_dict() shares the per-parameter dicts with the live optimizer: copy.
                sd["state"] = dict(sd["state"])
                leaves = sd["state"][key] = dict(sd["state"][key])
                for leaf in list(leaves):
                    got = row_sources(
                        OPTIMIZER_DIR, f"state.{key}.{leaf}", leaves[leaf], ids, table.num_rows, d
                    )
                    if got is not None:
                        sources += got
                        del leaves[leaf]
                if not leaves:
                    del sd["state"][key]
    return sources


def save_delta(
    checkpoint_dir: str,
    model: torch.nn.Module,
    optimizer: Any,
    tracker: RowTracker,
    parent: str,
    *,
    dense_ema: Any = None,
    extra_states: Mapping[str, Any] | None = None,
    dataloader_state: Mapping[str, Any] | None = None,
    user_metadata: Mapping[str, Any] | None = None,
    encoding: str = "raw",
    storage_options: Mapping[str, Any] | None = None,
    process_group: Any = None,
    touched: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, int]:
    """Collective: save a delta checkpoint on top of ``parent`` (the previous link).

    Every rank calls it: the touched rows are the union over ranks (one all-reduce per
    table); each rank writes the rows of its own shards; rank 0 writes the JSON files and
    commits. The checkpoint is assembled and written like every other
    (:func:`reckpt.save.engine.save_checkpoint`), the touched rows split out of the parts
    and the dynamic tables' touched keys only. The caller clears the tracker afterwards.

    Args:
        checkpoint_dir: ``<model_dir>/model.delta-<step>``.
        parent: the previous link (a full checkpoint or a delta) in the same model_dir.
        encoding: ``"raw"`` (lossless, default), ``"int8"`` or ``"fp16"`` for the weight rows.
        touched: the tracker's union of touched rows, when the caller already gathered it.

    Returns:
        Table key -> number of rows written.

    Raises:
        ConfigError: a bad name, encoding or parent (nothing written).
        StepAlreadyExistsError: a full checkpoint already holds this step.
    """
    return save_delta_in(
        storage_for(checkpoint_dir, storage_options),
        checkpoint_dir,
        model,
        optimizer,
        tracker,
        parent,
        dense_ema=dense_ema,
        extra_states=extra_states,
        dataloader_state=dataloader_state,
        user_metadata=user_metadata,
        encoding=encoding,
        process_group=process_group,
        touched=touched,
    )


def save_delta_in(
    storage: Storage,
    checkpoint_dir: str,
    model: torch.nn.Module,
    optimizer: Any,
    tracker: RowTracker,
    parent: str,
    *,
    dense_ema: Any = None,
    extra_states: Mapping[str, Any] | None = None,
    dataloader_state: Mapping[str, Any] | None = None,
    user_metadata: Mapping[str, Any] | None = None,
    encoding: str = "raw",
    process_group: Any = None,
    touched: Mapping[str, torch.Tensor] | None = None,
    write: CheckpointWrite | None = None,
) -> dict[str, int]:
    """Collective: :func:`save_delta` on an open storage (the manager's).

    ``write``: what writes the assembled delta (default: the engine, now). The manager's
    asynchronous save passes its background writer; the touched rows are then copied into
    the tracker's reused buffers before this returns (the snapshot), and written later.
    """
    target = checkpoint_dir.rstrip("/")
    step, parent = parse_delta_step(target), parent.rstrip("/")
    if step is None:
        raise ConfigError(f"{target}: a delta checkpoint must be named model.delta-<step>")
    if encoding not in ENCODINGS:
        raise ConfigError(f"delta encoding must be one of {ENCODINGS}, got {encoding!r}")
    if Storage.parent(parent) != Storage.parent(target):
        raise ConfigError(f"delta parent {parent} must be in the same model_dir as {target}")
    d = Dist(process_group)
    if checkpoint_state(storage, Storage.join(Storage.parent(target), checkpoint_name(step))) != "absent":
        raise StepAlreadyExistsError(f"{target}: model.ckpt-{step} already holds step {step}")
    if checkpoint_state(storage, parent) != "committed":
        raise CheckpointNotFoundError(f"delta parent {parent} is not a committed reckpt checkpoint")
    chain = chain_names(read_manifest(storage, parent), parent)
    union = touched if touched is not None else tracker.touched(process_group)

    def split(parts: list[Part]) -> list[FileWriter]:
        """The tracked tables' touched rows leave the parts for ``delta_rows/``."""
        rows = DeltaRows(_split_rows(parts, tracker, union, d, encoding), tracker.buffers)
        if write is not None:
            rows.freeze()  # written later, after the caller has trained on: copy the rows now

        def rows_writer(st: Storage, work: str) -> dict[str, FileRecord]:
            return rows.write(st, work, f"{DELTA_ROWS_DIR}/rank_{d.rank}")

        return [rows_writer]

    rows = {k: int(v.numel()) for k, v in union.items()}
    link = {
        "base": chain[0],
        "parent": basename(parent),
        "chain": chain,
        "rows": rows,
        "encoding": encoding,
        "lossless": encoding == "raw",
    }
    save_checkpoint(
        storage,
        target,
        model,
        optimizer,
        dense_ema,
        extra_states=extra_states,
        dataloader_state=dataloader_state,
        user_metadata=user_metadata,
        split=split,
        dynamic_keys="touched",
        delta=link,
        process_group=process_group,
        write=write,
    )
    return rows
