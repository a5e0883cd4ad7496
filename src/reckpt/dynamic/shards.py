"""Reading one table's ``dynamicemb/`` shards into new key maps, checked, ready to hand over.

Every file's size is checked first (a truncated or foreign file fails before anything is
read). The bytes then go straight into their final memory: the columns of new key maps
(:meth:`DynamicTable.empty_maps <reckpt.dynamic.table.DynamicTable.empty_maps>`), read in
regions of :data:`REGION` by :data:`READERS` threads at once, each through its own stream of
the storage layer (a local disk and an object store take the same path; the threads release
the GIL while reading; on a local disk with direct I/O, :mod:`reckpt.dynamic.directio`).
The keys come first; while the rows are still being read, the index
is built over them by two threads (:meth:`HashIndex.of_keys
<reckpt.dynamic.hashindex.HashIndex.of_keys>`, which also finds repeated keys). When every key
belongs to this rank (a load at world size 1) nothing is copied after the read; otherwise
each shard is read into scratch memory and this rank's keys are kept.

The result, :class:`Loaded`, is either handed to the table as it is
(:meth:`DynamicTable.adopt <reckpt.dynamic.table.DynamicTable.adopt>`: a replacing load of
distinct keys, no counted key with a row) or seen as a :class:`TableState` of views for
:meth:`DynamicTable.apply <reckpt.dynamic.table.DynamicTable.apply>` (upserts, and dumps
with repeated keys).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from reckpt.dynamic.columns import empty_array
from reckpt.dynamic.directio import aligned, local_fs, pread_all, set_direct
from reckpt.dynamic.index import LIVE, HashIndex, KeyMap
from reckpt.dynamic.table import DynamicTable, TableState
from reckpt.errors import IntegrityError
from reckpt.format.integrity import read_some
from reckpt.storage.core import Storage
from reckpt.storage.errors import storage_error

__all__ = ["Loaded", "ShardSet", "read_shards", "READERS", "REGION"]

READERS = 8
"""Parallel read streams (8 was the best of 1/2/4/8 raw cold-read streams measured)."""
REGION = 64 << 20
"""Bytes one stream reads of a file before another stream takes the next region."""

_ITEM = {
    "emb_keys": 8,
    "emb_values": 4,
    "emb_scores": 8,
    "emb_opt_values": 4,
    "counter_keys": 8,
    "counter_frequencies": 8,
    "removed_keys": 8,
}


@dataclass
class ShardSet:
    """One source rank's files of a table: kind -> (path, size); only the kinds present."""

    files: dict[str, tuple[str, int]]

    def count(self, kind: str) -> int:
        """Entries of ``kind`` in the shard (0 when absent)."""
        got = self.files.get(kind)
        return 0 if got is None else got[1] // _ITEM[kind]


@dataclass
class Loaded:
    """A table's rows and counters read from a dump, in key maps of their own (not yet in the table).

    Attributes:
        rows, counts: the key maps; ids ``0..n-1`` in file order.
        removed: the dump's removed keys (this rank's), or ``None`` when it has none.
        adoptable: the index is built, the keys are distinct and no counted key has a row.
    """

    rows: KeyMap
    counts: KeyMap
    removed: np.ndarray | None
    adoptable: bool

    def state(self) -> TableState:
        """The same contents as a :class:`TableState` of views (for :meth:`DynamicTable.apply`)."""
        r, c = self.rows, self.counts
        return TableState(
            keys=torch.from_numpy(r.keys.np),
            values=torch.from_numpy(r.cols["values"].np),
            opt_values=torch.from_numpy(r.cols["opt"].np),
            scores=torch.from_numpy(r.cols["scores"].np),
            counter_keys=torch.from_numpy(c.keys.np),
            counter_freqs=torch.from_numpy(c.cols["freq"].np),
            removed_keys=None if self.removed is None else torch.from_numpy(self.removed),
        )


def _bytes_of(arr: np.ndarray) -> memoryview:
    return arr.reshape(-1).view(np.uint8).data


def _read_region(storage: Storage, path: str, offset: int, view: memoryview) -> None:
    """Read ``len(view)`` bytes of ``path`` from ``offset`` into ``view``.

    On the local file system with aligned memory, with direct I/O (no page-cache copy).
    """
    with storage.open(path, "rb") as f:
        if local_fs(storage):
            fd = f.fileno()
            direct = aligned(view, offset) and set_direct(fd, True)
            try:
                got = pread_all(fd, view, offset, direct)
            except OSError as e:
                raise storage_error(e, "read", path, 1) from e
        else:
            if offset:
                f.seek(offset)
            got = 0
            while got < len(view) and (n := read_some(f, view[got:])):
                got += n
        if got < len(view):
            raise IntegrityError(
                f"{path}: ended after {offset + got} bytes, {offset + len(view)} expected;"
                " the file changed while it was read"
            )


class _Reads:
    """File regions read into memory by a pool of threads; futures grouped by name."""

    def __init__(self, storage: Storage, pool: ThreadPoolExecutor) -> None:
        self.storage, self.pool = storage, pool
        self.groups: dict[str, list[Future[None]]] = {}

    def file(self, group: str, path: str, into: np.ndarray) -> None:
        """Read all of ``path`` into ``into`` (exactly its size), in regions."""
        view = _bytes_of(into)
        jobs = self.groups.setdefault(group, [])
        for start in range(0, len(view), REGION):
            part = view[start : start + REGION]
            jobs.append(self.pool.submit(_read_region, self.storage, path, start, part))

    def wait(self, group: str) -> None:
        """Wait for a group's reads; raise the first failure."""
        for job in self.groups.pop(group, []):
            job.result()

    def wait_all(self) -> None:
        for group in list(self.groups):
            self.wait(group)


def _index(m: KeyMap) -> bool:
    """Index the keys of ``m`` (ids ``0..n-1``, all live); whether they are distinct."""
    index, distinct = HashIndex.of_keys(m.keys.np, m.k)
    if not distinct:
        return False
    m.index = index
    m.flags.np[:] = LIVE
    return True


def read_shards(
    storage: Storage, table: DynamicTable, shards: list[ShardSet], rank: int, world: int, load_optim: bool
) -> Loaded:
    """Read checked shards (sizes already match) into new key maps, keeping ``key % world == rank``."""
    rows, counts = table.empty_maps()
    with ThreadPoolExecutor(READERS, thread_name_prefix="reckpt-dyn-read") as pool:
        reads = _Reads(storage, pool)
        try:
            if world == 1:
                removed = _read_all(reads, shards, rows, counts, load_optim)
            else:
                removed = _read_mine(reads, shards, rows, counts, load_optim, rank, world)
            reads.wait("keys")
            distinct = _index(rows) and _index(counts)  # while the rows are still being read
            reads.wait_all()
        except BaseException:
            for jobs in reads.groups.values():
                for job in jobs:
                    job.cancel()
            raise
    disjoint = not (len(rows) and len(counts)) or not bool((rows.find(counts.keys.np) >= 0).any())
    return Loaded(rows, counts, removed, distinct and disjoint)


_COLS = (("emb_values", "values"), ("emb_scores", "scores"), ("emb_opt_values", "opt"))


def _sizes(m: KeyMap, n: int) -> None:
    for c in (m.keys, m.flags, *m.cols.values()):
        c.resize(n)


def _read_all(
    reads: _Reads, shards: list[ShardSet], rows: KeyMap, counts: KeyMap, load_optim: bool
) -> np.ndarray | None:
    """Every key is this rank's: each file straight into its place in the columns."""
    _sizes(rows, sum(s.count("emb_keys") for s in shards))
    _sizes(counts, sum(s.count("counter_keys") for s in shards))
    gone = [s for s in shards if "removed_keys" in s.files]
    removed = empty_array((sum(s.count("removed_keys") for s in gone),), np.int64) if gone else None
    at = {"rows": 0, "counts": 0, "removed": 0}
    for s in shards:  # keys first: the index is built while the rest is read
        n, m = s.count("emb_keys"), s.count("counter_keys")
        reads.file("keys", s.files["emb_keys"][0], rows.keys.np[at["rows"] : at["rows"] + n])
        if m:
            reads.file("keys", s.files["counter_keys"][0], counts.keys.np[at["counts"] : at["counts"] + m])
        at["rows"] += n
        at["counts"] += m
    at["rows"] = at["counts"] = 0
    for s in shards:
        n, m = s.count("emb_keys"), s.count("counter_keys")
        for kind, name in _COLS:
            if kind in s.files and (load_optim or name != "opt"):
                reads.file("rows", s.files[kind][0], rows.cols[name].np[at["rows"] : at["rows"] + n])
        if m:
            freq = counts.cols["freq"].np[at["counts"] : at["counts"] + m]
            reads.file("rows", s.files["counter_frequencies"][0], freq)
        if removed is not None and "removed_keys" in s.files:
            k = s.count("removed_keys")
            reads.file("rows", s.files["removed_keys"][0], removed[at["removed"] : at["removed"] + k])
            at["removed"] += k
        at["rows"] += n
        at["counts"] += m
    return removed


def _read_mine(
    reads: _Reads,
    shards: list[ShardSet],
    rows: KeyMap,
    counts: KeyMap,
    load_optim: bool,
    rank: int,
    world: int,
) -> np.ndarray | None:
    """Some keys are other ranks': each shard into scratch memory, then this rank's entries kept."""

    def scratch(s: ShardSet, kind: str, shape: tuple[int, ...], dtype: object) -> np.ndarray:
        arr = empty_array(shape, dtype)
        reads.file("scratch", s.files[kind][0], arr)
        return arr

    key_kinds = ("emb_keys", "counter_keys", "removed_keys")
    key_files = [
        {k: scratch(s, k, (s.count(k),), np.int64) for k in key_kinds if k in s.files} for s in shards
    ]
    reads.wait("scratch")
    masks = [{k: np.remainder(a, world) == rank for k, a in kf.items()} for kf in key_files]
    _sizes(rows, sum(int(mk["emb_keys"].sum()) for mk in masks))
    _sizes(counts, sum(int(mk["counter_keys"].sum()) for mk in masks if "counter_keys" in mk))
    removed = [
        kf["removed_keys"][mk["removed_keys"]]
        for kf, mk in zip(key_files, masks, strict=True)
        if "removed_keys" in kf
    ]
    at_r = at_c = 0
    for s, kf, mk in zip(shards, key_files, masks, strict=True):
        n_all = s.count("emb_keys")
        cols = {
            name: scratch(s, kind, (n_all, *rows.cols[name].row), rows.cols[name].dtype)
            for kind, name in _COLS
            if kind in s.files and (load_optim or name != "opt")
        }
        freq = None
        if "counter_keys" in kf:
            freq = scratch(s, "counter_frequencies", (s.count("counter_keys"),), np.int64)
        reads.wait("scratch")
        n = int(mk["emb_keys"].sum())
        np.compress(mk["emb_keys"], kf["emb_keys"], out=rows.keys.np[at_r : at_r + n])
        for name, arr in cols.items():
            np.compress(mk["emb_keys"], arr, axis=0, out=rows.cols[name].np[at_r : at_r + n])
        at_r += n
        if freq is not None:
            m = int(mk["counter_keys"].sum())
            np.compress(mk["counter_keys"], kf["counter_keys"], out=counts.keys.np[at_c : at_c + m])
            np.compress(mk["counter_keys"], freq, out=counts.cols["freq"].np[at_c : at_c + m])
            at_c += m
    return np.concatenate(removed) if removed else None
