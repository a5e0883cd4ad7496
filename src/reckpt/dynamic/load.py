"""Reading a ``dynamicemb/`` folder back into dynamic tables, at any world size.

Every rank reads every shard of a table and keeps the keys it owns now
(``key % world_size == rank``). Everything is read and checked before any table changes:
the sizes of every file first, then the bytes, straight into new key maps
(:mod:`reckpt.dynamic.shards`) that a replacing load hands to the table without a copy.
See :mod:`reckpt.dynamic.dump` for the layout.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from reckpt.dist import Dist
from reckpt.dynamic.dump import REMOVED, SHARD_RE, dynamic_tables, shard_name, table_of
from reckpt.dynamic.module import DynamicEmbedding
from reckpt.dynamic.shards import Loaded, ShardSet, read_shards
from reckpt.errors import CheckpointNotFoundError, IntegrityError
from reckpt.naming import DYNAMICEMB_DIR
from reckpt.storage.core import Storage, storage_for

__all__ = ["load_dynamic", "prepare_dynamic", "read_dynamic", "PendingDynamicLoad", "DynamicLoadReport"]

logger = logging.getLogger(__name__)


@dataclass
class DynamicLoadReport:
    """What :func:`load_dynamic` did on this rank.

    Attributes:
        loaded: ``"<path>/<table>"`` -> rows now held by this rank from the checkpoint.
        missing: tables of the model the checkpoint lacks (kept as they were).
        unused: tables in the checkpoint the model lacks.
        skipped: tables left out by ``table_names``.
        source_world_size: ``"<path>/<table>"`` -> world size of the dump read.
        optimizer_loaded: whether optimizer rows were loaded (else reset to zero).
    """

    loaded: dict[str, int] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    source_world_size: dict[str, int] = field(default_factory=dict)
    optimizer_loaded: bool = True


def _saved_tables(storage: Storage, root: str) -> dict[tuple[str, str], list[str]]:
    """``{(path, table): [file names]}`` found under ``root`` (one level of collection folders)."""
    found: dict[tuple[str, str], list[str]] = {}
    for path in storage.ls(root):
        for fname in storage.ls(Storage.join(root, path)):
            table = table_of(fname)
            if table is not None:
                found.setdefault((path, table), []).append(fname)
    return found


class _Reader:
    """Checks one table's shards (every rank reads every shard, keeps its keys)."""

    def __init__(self, storage: Storage, folder: str, table: str, files: list[str], dim: int) -> None:
        self.storage, self.folder, self.table, self.dim = storage, folder, table, dim
        worlds = {int(m["world"]) for f in files if (m := SHARD_RE.fullmatch(f[len(table) + 1 :]))}
        if not worlds:
            raise CheckpointNotFoundError(
                f"{folder}: table {table!r} has no shard files ({table}_emb_keys.rank_R.world_size_W);"
                " the checkpoint is incomplete"
            )
        if len(worlds) != 1:
            raise IntegrityError(
                f"{folder}: table {table!r} has shard files of {len(worlds)} world sizes"
                f" ({sorted(worlds)}); a dump holds exactly one set of shards. Remove the stray files."
            )
        self.world = worlds.pop()
        self.files = set(files)

    def _size(self, kind: str, rank: int, item: int, required: bool) -> tuple[str, int] | None:
        """``(path, size)`` of a shard file (``None``: absent and not required), size checked."""
        name = shard_name(self.table, kind, rank, self.world)
        if name not in self.files:
            if required:
                raise CheckpointNotFoundError(
                    f"{self.folder}/{name}: shard file missing (a dump of world size {self.world}"
                    f" needs all {self.world} shards); the checkpoint is incomplete"
                )
            return None
        path = Storage.join(self.folder, name)
        size = self.storage.size(path)
        if size % item:
            raise IntegrityError(
                f"{self.folder}/{name}: {size} bytes is not a whole number of {item}-byte entries;"
                " the file is truncated or corrupt"
            )
        return path, size

    def _check(self, kind: str, rank: int, got: tuple[str, int] | None, n: int, item: int, what: str) -> None:
        if got is not None and got[1] != n * item:
            raise IntegrityError(
                f"{self.folder}/{shard_name(self.table, kind, rank, self.world)}: {got[1]} bytes, expected"
                f" {n * item} ({n} keys x {what}); the file is truncated or does not belong to this table"
            )

    def shards(self, load_optim: bool) -> list[ShardSet]:
        """Every source rank's files, their sizes checked against each other and the table's dim."""
        out = []
        for r in range(self.world):
            files: dict[str, tuple[str, int] | None] = {}
            files["emb_keys"] = keys = self._size("emb_keys", r, 8, True)
            n = keys[1] // 8 if keys is not None else 0
            files["emb_values"] = self._size("emb_values", r, 4, True)
            self._check("emb_values", r, files["emb_values"], n, 4 * self.dim, f"{self.dim} float32")
            files["emb_scores"] = self._size("emb_scores", r, 8, False)
            self._check("emb_scores", r, files["emb_scores"], n, 8, "1 int64")
            files["emb_opt_values"] = self._size("emb_opt_values", r, 4, False) if load_optim else None
            self._check("emb_opt_values", r, files["emb_opt_values"], n, 4, "1 float32 (row-wise Adagrad)")
            files["counter_keys"] = ck = self._size("counter_keys", r, 8, False)
            m = ck[1] // 8 if ck is not None else 0
            files["counter_frequencies"] = self._size("counter_frequencies", r, 8, ck is not None)
            self._check("counter_frequencies", r, files["counter_frequencies"], m, 8, "1 int64")
            files[REMOVED] = self._size(REMOVED, r, 8, False)
            if ck is None:
                files.pop("counter_frequencies")  # nothing to count (an empty file, checked above)
            out.append(ShardSet({k: v for k, v in files.items() if v is not None}))
        return out


def load_dynamic(
    checkpoint_dir: str,
    model: torch.nn.Module,
    *,
    storage_options: Mapping[str, Any] | None = None,
    subdir: str = DYNAMICEMB_DIR,
    upsert: bool = False,
    table_names: Mapping[str, Sequence[str]] | None = None,
    load_optim: bool = True,
    process_group: Any = None,
) -> DynamicLoadReport:
    """Collective: load the ``dynamicemb/`` folder of a checkpoint into the model's dynamic tables.

    Every rank reads every shard of each table and keeps the keys it owns now
    (``key % world_size == rank``), so a dump of any world size restores at any other. All
    files are read and checked (sizes, the full set of shards) on every rank before any
    table changes; any error is raised on every rank.

    Args:
        checkpoint_dir: the checkpoint (or any folder holding ``subdir``).
        model: the model whose :class:`DynamicEmbedding` tables are filled.
        storage_options: fsspec options for URLs.
        subdir: the folder inside the checkpoint.
        upsert: ``False`` replaces each table's content; ``True`` writes the rows on top and
            deletes the dump's removed keys (applying an incremental checkpoint).
        table_names: collection path -> table names to load (TorchEasyRec's
            ``meta.dynamicemb_load_table_names``); ``None``: all.
        load_optim: load optimizer rows (``False``: they restart at zero).
        process_group: group on which errors are gathered (default: the default group).

    Returns:
        This rank's :class:`DynamicLoadReport`.

    Raises:
        CheckpointNotFoundError: a shard file is missing.
        IntegrityError: a file's size does not fit the table (truncated, wrong dim).

    Example:
        >>> # report = load_dynamic("run/model.ckpt-100", model)
    """
    pending = prepare_dynamic(
        checkpoint_dir,
        model,
        storage_options=storage_options,
        subdir=subdir,
        table_names=table_names,
        load_optim=load_optim,
        process_group=process_group,
    )
    return pending.apply(upsert=upsert)


class PendingDynamicLoad:
    """Dynamic tables read and checked, not yet applied (see :func:`prepare_dynamic`)."""

    def __init__(self, root: str, report: DynamicLoadReport) -> None:
        self.root, self.report = root, report
        self.items: list[tuple[str, DynamicEmbedding, Loaded, dict[str, Any]]] = []

    def apply(self, *, upsert: bool = False) -> DynamicLoadReport:
        """Fill the tables (local: no collective); returns the report.

        A replacing load of distinct keys hands the key maps read to the table as they are
        (:meth:`DynamicTable.adopt`); an upsert writes them on top (:meth:`DynamicTable.apply`).
        """
        load_optim = self.report.optimizer_loaded
        for tid, m, loaded, args in self.items:
            t = m.table
            scores = loaded.rows.cols["scores"].np
            top = int(scores.max()) if len(scores) else None
            if not upsert and loaded.adoptable:
                t.adopt(loaded.rows, loaded.counts)
            else:
                if not upsert:
                    t.clear()
                t.apply(loaded.state(), load_optim=load_optim)
            if isinstance(args.get("clock"), int):
                t.clock = args["clock"]
            elif top is not None and t.eviction == "lru":  # a dump without our settings file
                t.clock = max(t.clock, top)
            t.clear_touched()  # the restored state is the baseline of the next incremental dump
            self.report.loaded[tid] = len(t)
        for tid in self.report.missing:
            logger.warning(
                "%s: no dynamic table %s in the checkpoint; it keeps its current rows", self.root, tid
            )
        return self.report


def prepare_dynamic(
    checkpoint_dir: str,
    model: torch.nn.Module,
    *,
    storage_options: Mapping[str, Any] | None = None,
    subdir: str = DYNAMICEMB_DIR,
    table_names: Mapping[str, Sequence[str]] | None = None,
    load_optim: bool = True,
    process_group: Any = None,
) -> PendingDynamicLoad:
    """Collective: read and check every shard (raising on all ranks on any error); change nothing.

    Same arguments as :func:`load_dynamic`; call :meth:`PendingDynamicLoad.apply` to load.
    """
    storage = storage_for(Storage.join(checkpoint_dir.rstrip("/"), subdir), storage_options)
    return read_dynamic(
        storage,
        checkpoint_dir,
        model,
        subdir=subdir,
        table_names=table_names,
        load_optim=load_optim,
        process_group=process_group,
    )


def read_dynamic(
    storage: Storage,
    checkpoint_dir: str,
    model: torch.nn.Module,
    *,
    subdir: str = DYNAMICEMB_DIR,
    table_names: Mapping[str, Sequence[str]] | None = None,
    load_optim: bool = True,
    process_group: Any = None,
) -> PendingDynamicLoad:
    """Collective: :func:`prepare_dynamic` on the checkpoint's open ``storage``.

    Every rank reads every shard of each table and keeps its own keys; an error on any
    rank is raised on every rank, before any table changes.
    """
    d = Dist(process_group)
    root = Storage.join(checkpoint_dir.rstrip("/"), subdir)
    pending = PendingDynamicLoad(root, DynamicLoadReport(optimizer_loaded=load_optim))
    tables = dynamic_tables(model)
    for m in tables.values():  # may create the shard group: collective, so before anything can fail
        m.shard()
    report = pending.report
    err: BaseException | None = None
    try:
        saved = _saved_tables(storage, root)
        report.unused = sorted(f"{p}/{t}" for p, t in saved if (p, t) not in tables)
        for (path, name), m in tables.items():
            tid = f"{path}/{name}"
            if table_names is not None and name not in table_names.get(path, ()):
                report.skipped.append(tid)
            elif (path, name) not in saved:
                report.missing.append(tid)
            else:
                reader = _Reader(
                    storage, Storage.join(root, path), name, saved[(path, name)], m.embedding_dim
                )
                rank, world = m.shard()
                args = _read_args(storage, Storage.join(root, path, f"{name}_opt_args.json"))
                shards = reader.shards(load_optim)
                loaded = read_shards(storage, m.table, shards, rank, world, load_optim)
                pending.items.append((tid, m, loaded, args))
                report.source_world_size[tid] = reader.world
    except Exception as e:
        err = e
    d.raise_if_any(err, f"reading {root}")
    return pending


def _read_args(storage: Storage, path: str) -> dict[str, Any]:
    if not storage.exists(path):
        return {}
    try:
        doc = json.loads(storage.read_text(path))
    except ValueError as e:
        raise IntegrityError(f"{path}: not valid JSON ({e})") from e
    return doc if isinstance(doc, dict) else {}


class RestoreStep:
    """``restore_model``'s dynamicemb step: checked with the other parts, applied after them."""

    def __init__(self, pending: PendingDynamicLoad, upsert: bool) -> None:
        self.pending, self.upsert = pending, upsert

    def apply(self, report: Any) -> None:
        """Fill the tables and record them as the ``dynamicemb`` part of a ``LoadReport``."""
        r = self.pending.apply(upsert=self.upsert)
        part = report.part(DYNAMICEMB_DIR)
        part.loaded = sorted(r.loaded)
        part.missing = sorted(r.missing)
        part.unused = list(r.unused)
        if r.skipped:
            report.notes.append(f"{DYNAMICEMB_DIR}: meta.dynamicemb_load_table_names left out {r.skipped}")
        if not r.optimizer_loaded and r.loaded:
            report.notes.append(f"{DYNAMICEMB_DIR}: optimizer rows not loaded; they restart at zero")


def restore_step(
    storage: Storage,
    checkpoint_dir: str,
    model: torch.nn.Module,
    meta: Mapping[str, Any],
    *,
    optimizer_restored: bool,
    upsert: bool,
    process_group: Any,
) -> RestoreStep | None:
    """Collective: read and check a checkpoint's ``dynamicemb/`` for ``restore_model`` (compat §5.2 step 8).

    ``None`` when the checkpoint has no ``dynamicemb/`` folder. TorchEasyRec's ``meta`` keys
    choose what loads: ``dynamicemb_load_table_names`` (collection path -> table names;
    default all) and ``dynamicemb_load_optim`` (default: whether the optimizer is restored).
    """
    if not storage.isdir(Storage.join(checkpoint_dir, DYNAMICEMB_DIR)):
        return None
    names = meta.get("dynamicemb_load_table_names")
    load_optim = meta.get("dynamicemb_load_optim")
    pending = read_dynamic(
        storage,
        checkpoint_dir,
        model,
        table_names=names if isinstance(names, Mapping) else None,
        load_optim=optimizer_restored if load_optim is None else bool(load_optim),
        process_group=process_group,
    )
    return RestoreStep(pending, upsert)
