"""The manager's incremental mode: full checkpoints every K saves, deltas in between.

:class:`Incremental` keeps the row tracker and the current chain (the last full checkpoint
and the deltas on top of it) for :class:`reckpt.CheckpointManager`; the decision itself is
the pure :func:`reckpt.policy.next_save_kind`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from reckpt.commit.state import checkpoint_state
from reckpt.delta.row_tracker import RowTracker
from reckpt.delta.rows import global_nbytes
from reckpt.delta.save import save_delta_in
from reckpt.format.manifest import chain_names, read_manifest
from reckpt.lifecycle.discovery import scan_in
from reckpt.naming import basename, delta_name
from reckpt.policy import IncrementalPolicy, next_save_kind
from reckpt.save.contents import CheckpointWrite
from reckpt.storage.core import Storage, storage_for

__all__ = ["Incremental", "latest_restorable", "latest_restorable_in"]

logger = logging.getLogger(__name__)


def latest_restorable(
    model_dir: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[str | None, int]:
    """``(path, step)`` of the newest committed full or delta checkpoint, ``(None, -1)`` if none."""
    return latest_restorable_in(storage_for(model_dir, storage_options), model_dir)


def latest_restorable_in(storage: Storage, model_dir: str) -> tuple[str | None, int]:
    """:func:`latest_restorable` on an open storage."""
    infos = [c for c in scan_in(storage, model_dir, with_size=False)[0] if c.committed]
    return (infos[-1].path, infos[-1].step) if infos else (None, -1)


class Incremental:
    """Tracker and chain state of one manager (every rank holds one).

    Args:
        policy: when to write deltas.
        model_dir: the manager's model_dir.
        storage: its storage (the manager's).
        process_group: the training process group.
    """

    def __init__(
        self,
        policy: IncrementalPolicy,
        model_dir: str,
        storage: Storage,
        process_group: Any,
    ) -> None:
        self.policy = policy
        self.model_dir = model_dir
        self.storage = storage
        self._pg = process_group
        self.tracker: RowTracker | None = None
        self.chain: list[str] = []  # names: the last full checkpoint, then deltas

    def attach(self, model: torch.nn.Module) -> RowTracker:
        """The tracker of ``model`` (hooks installed at the first call)."""
        if self.tracker is None:
            self.tracker = RowTracker(model, tables=self.policy.tables)
        return self.tracker

    def maybe_save_delta(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: Any,
        *,
        write: CheckpointWrite | None = None,
        **kwargs: Any,
    ) -> str | None:
        """Collective: save a delta for ``step`` when the policy says so; returns its path or ``None``.

        ``write``: the manager's background writer for an asynchronous save (``None``: the
        delta is written and committed before this returns). Asynchronous deltas copy the
        touched rows and freeze the dense part while the caller waits (the same stall as a
        full asynchronous save), then write and commit in the background; the tracker starts
        over at once, since the frozen rows are the delta's.

        A link that never committed (an asynchronous save that failed) ends the chain: the
        rows touched before it were cleared from the tracker, so the next save is a full one.
        """
        tracker = self.attach(model)
        parent = Storage.join(self.model_dir, self.chain[-1]) if self.chain else None
        if parent is not None and checkpoint_state(self.storage, parent) != "committed":
            logger.warning(
                "step %d: %s did not commit; saving a full checkpoint instead of a delta on it",
                step,
                self.chain[-1],
            )
            self.chain = []
        touched = tracker.touched(self._pg)
        sd = model.state_dict()
        full = sum(global_nbytes(v) for v in sd.values())
        tracked = sum(global_nbytes(sd[k]) for k in tracker.tables if k in sd)
        changed = sum(
            global_nbytes(sd[k]) * int(touched[k].numel()) // max(t.num_rows, 1)
            for k, t in tracker.tables.items()
            if k in sd
        )
        kind, why = next_save_kind(
            self.policy,
            has_parent=bool(self.chain),
            deltas_since_full=max(len(self.chain) - 1, 0),
            delta_bytes=full - tracked + changed,
            full_bytes=full,
        )
        logger.info("step %d: %s checkpoint (%s)", step, kind, why)
        if kind == "full":
            return None
        path = Storage.join(self.model_dir, delta_name(step))
        parent = Storage.join(self.model_dir, self.chain[-1])
        save_delta_in(
            self.storage,
            path,
            model,
            optimizer,
            tracker,
            parent,
            encoding=self.policy.encoding,
            process_group=self._pg,
            touched=touched,
            write=write,
            **kwargs,
        )
        self.chain.append(basename(path))
        tracker.clear()
        return path

    def saved_full(self, path: str) -> None:
        """A full checkpoint was saved (or staged): it is the new base."""
        self.chain = [basename(path)]
        if self.tracker is not None:
            self.tracker.clear()

    def restored(self, path: str, model: torch.nn.Module) -> None:
        """``path`` was restored: the next delta builds on it (only within this model_dir)."""
        self.attach(model).clear()
        if Storage.parent(path.rstrip("/")) != self.model_dir:
            self.chain = []
            return
        self.chain = chain_names(read_manifest(self.storage, path), path)
