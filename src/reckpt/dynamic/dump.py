"""The ``dynamicemb/`` folder of a checkpoint: dynamic tables, one file set per table and rank.

Layout (TorchEasyRec's dynamicemb dump, compat §5.4), for the table ``<t>`` of the module
at ``<path>`` (``model.`` + the module's name with wrapper prefixes stripped) written by
rank ``R`` of ``W``::

    dynamicemb/<path>/<t>_emb_keys.rank_R.world_size_W          int64 keys, sorted
    dynamicemb/<path>/<t>_emb_values.rank_R.world_size_W        float32, dim per key
    dynamicemb/<path>/<t>_emb_scores.rank_R.world_size_W        int64 eviction scores
    dynamicemb/<path>/<t>_emb_opt_values.rank_R.world_size_W    float32 Adagrad state, 1 per key
    dynamicemb/<path>/<t>_counter_keys.rank_R.world_size_W      int64 not-yet-admitted keys
    dynamicemb/<path>/<t>_counter_frequencies.rank_R.world_size_W  int64 their counts
    dynamicemb/<path>/<t>_opt_args.json                         optimizer and table settings

All numbers are raw little-endian; an empty shard is a set of zero-byte files; every rank
writes its set, so a dump holds ``W`` complete shards. A dump of touched rows only (an
incremental checkpoint) adds ``<t>_removed_keys.rank_R.world_size_W`` (evicted keys).
Every file goes through :class:`~reckpt.storage.core.Storage` and into the manifest; a
shard's files are written in parallel, straight from memory (:mod:`reckpt.dynamic.files`).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping
from typing import Any

import torch

from reckpt.dynamic.files import write_shard
from reckpt.dynamic.module import DynamicEmbedding
from reckpt.dynamic.snapshot import Snapshot
from reckpt.errors import ConfigError
from reckpt.format.integrity import FileRecord
from reckpt.format.manifest import TensorEntry
from reckpt.format.records import FileWriter, write_record
from reckpt.naming import DYNAMICEMB_DIR
from reckpt.storage.core import Storage

__all__ = [
    "dynamic_tables",
    "dynamic_writer",
    "table_entries",
    "table_of",
    "shard_name",
    "KINDS",
    "REMOVED",
    "SHARD_RE",
]

_WRAPPERS = {"_dmp_wrapped_module", "_orig_mod"}
_DDP_LIKE = {"DistributedDataParallel", "FullyShardedDataParallel", "DistributedModelParallel"}
SHARD_RE = re.compile(r"(?P<kind>[a-z_]+)\.rank_(?P<rank>0|[1-9][0-9]*)\.world_size_(?P<world>[1-9][0-9]*)")
KINDS = ("emb_keys", "emb_values", "emb_scores", "emb_opt_values", "counter_keys", "counter_frequencies")
REMOVED = "removed_keys"


def dynamic_tables(model: torch.nn.Module) -> dict[tuple[str, str], DynamicEmbedding]:
    """``{(collection path, table name): module}`` of every :class:`DynamicEmbedding` in ``model``.

    Paths are rooted at the literal ``model`` like TorchEasyRec's (``model.dyn.user``), with
    wrapper prefixes (DistributedModelParallel, DDP, ``torch.compile``) stripped, so they do
    not change when a model is wrapped.
    """
    out: dict[tuple[str, str], DynamicEmbedding] = {}

    def walk(mod: torch.nn.Module, path: str) -> None:
        for name, child in mod.named_children():
            wrapper = name in _WRAPPERS or (name == "module" and type(mod).__name__ in _DDP_LIKE)
            sub = path if wrapper else f"{path}.{name}"
            if isinstance(child, DynamicEmbedding):
                key = (sub, child.name or name)
                if key in out:
                    raise ConfigError(f"two DynamicEmbedding modules at {sub} are both named {key[1]!r}")
                out[key] = child
            else:
                walk(child, sub)

    if isinstance(model, DynamicEmbedding):
        out[("model", model.name or "table")] = model
    else:
        walk(model, "model")
    return out


def shard_name(table: str, kind: str, rank: int, world: int) -> str:
    return f"{table}_{kind}.rank_{rank}.world_size_{world}"


def table_of(fname: str) -> str | None:
    """The table of a dump file (``user_emb_keys.rank_0.world_size_2`` -> ``"user"``), else ``None``."""
    if fname.endswith("_opt_args.json"):
        return fname[: -len("_opt_args.json")] or None
    for kind in (*KINDS, REMOVED):
        head, marker, tail = fname.rpartition(f"_{kind}.rank_")
        if marker and head and SHARD_RE.fullmatch(f"{kind}.rank_{tail}"):
            return head
    return None


def _opt_args(m: DynamicEmbedding) -> dict[str, Any]:
    t = m.table
    return {
        "optimizer": "rowwise_adagrad",
        "lr": m.lr,
        "eps": m.eps,
        "embedding_dim": m.embedding_dim,
        "eviction": t.eviction,
        "capacity": t.capacity,
        "admit_threshold": t.admit_threshold,
        "clock": t.clock,
    }


def dynamic_writer(
    model: torch.nn.Module,
    *,
    keys: str = "all",
    subdir: str = DYNAMICEMB_DIR,
    process_group: Any = None,
) -> FileWriter | None:
    """A save hook writing the model's dynamic tables, or ``None`` when it has none.

    The tables are frozen now (so an asynchronous save may train on while the hook writes
    later): each takes a :class:`~reckpt.dynamic.snapshot.Snapshot` (all rows, or the touched
    ones), copied only if the table changes before the hook has read it.
    The hook (called once) writes this rank's shard of every table (rank 0 adds the
    ``_opt_args.json`` files) and returns the manifest records.

    Args:
        model: the model (wrapped or not).
        keys: ``"all"`` rows, or ``"touched"``: only rows changed since ``clear_touched()``,
            plus the keys evicted since then (incremental checkpoints).
        subdir: the folder inside the checkpoint.
        process_group: unused by the hook itself (it runs no collective); kept for symmetry.
    """
    if keys not in ("all", "touched"):
        raise ConfigError(f"dynamic_writer: keys must be 'all' or 'touched', got {keys!r}")
    tables = dynamic_tables(model)
    if not tables:
        return None
    del process_group
    snaps: list[tuple[str, str, int, int, Snapshot, dict[str, Any]]] = []
    for (path, name), m in tables.items():
        rank, world = m.shard()
        src = m.table.snapshot(touched=keys == "touched")
        snaps.append((path, name, rank, world, src, _opt_args(m)))
    ran = threading.Lock()

    def write(storage: Storage, work: str) -> dict[str, FileRecord]:
        if not ran.acquire(blocking=False):
            raise RuntimeError("a dynamic_writer hook writes once; take a new one for another save")
        records: dict[str, FileRecord] = {}
        try:
            for path, name, rank, world, src, args in snaps:
                folder = f"{subdir}/{path}"
                kinds = [*KINDS, REMOVED] if src.removed is not None else list(KINDS)
                files = {kind: f"{folder}/{shard_name(name, kind, rank, world)}" for kind in kinds}
                records.update(write_shard(storage, work, files, src))
                if rank == 0:
                    rel = f"{folder}/{name}_opt_args.json"
                    records[rel] = write_record(storage, work, rel, json.dumps(args, sort_keys=True).encode())
        finally:
            for *_, src, _ in snaps:
                src.release()  # the table may change freely again
        return records

    return write


def table_entries(files: Mapping[str, FileRecord], subdir: str = DYNAMICEMB_DIR) -> list[TensorEntry]:
    """One entry per dynamic table of a manifest's file records (for ``reckpt inspect``).

    ``<path>/<t>``: shape ``[rows of all shards, dim]``, float32; bytes: all of the table's files.

    Example:
        >>> recs = {"dynamicemb/model.u/u_emb_keys.rank_0.world_size_1": FileRecord("", 16, ""),
        ...         "dynamicemb/model.u/u_emb_values.rank_0.world_size_1": FileRecord("", 64, "")}
        >>> table_entries(recs)
        [TensorEntry(name='model.u/u', shape=[2, 8], dtype='float32', bytes=80)]
    """
    keys: dict[str, int] = {}
    values: dict[str, int] = {}
    total: dict[str, int] = {}
    for rel, rec in files.items():
        head, sep, rest = rel.partition("/")
        path, _, fname = rest.rpartition("/")
        if head != subdir or not sep or not path:
            continue
        table = table_of(fname)
        if table is None:
            continue
        kind = next((k for k in ("emb_keys", "emb_values") if fname.startswith(f"{table}_{k}.rank_")), None)
        name = f"{path}/{table}"
        total[name] = total.get(name, 0) + rec.size
        if kind == "emb_keys":
            keys[name] = keys.get(name, 0) + rec.size // 8
        elif kind == "emb_values":
            values[name] = values.get(name, 0) + rec.size // 4
    out = []
    for name in sorted(total):
        rows = keys.get(name, 0)
        shape = [rows, values.get(name, 0) // rows] if rows else None
        out.append(TensorEntry(name, shape, "float32", total[name]))
    return out
