"""The common case of a training lookup: every absent key gets a row at once.

With no admission counter in use (threshold met by every count), no eviction due and no
counted keys, a training lookup is a lookup plus an insert of the absent keys: one probe of
the index per key (:meth:`reckpt.dynamic.index.KeyMap.upsert`) does both. The result is
exactly that of ``DynamicTable.lookup``'s general path (count, admit, make room, insert).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from reckpt.dynamic.evict import Evictor
from reckpt.dynamic.index import KeyMap
from reckpt.dynamic.initial import write_init


class DynamicTable(Protocol):
    """What these steps use of :class:`reckpt.dynamic.table.DynamicTable`."""

    rows: KeyMap
    counts: KeyMap
    removed: KeyMap
    evictor: Evictor
    capacity: int | None
    admit_threshold: int
    eviction: str
    clock: int
    dim: int
    seed: int
    init_bound: float


__all__ = ["admits_all", "lookup_admitting"]


def admits_all(table: DynamicTable, cnt: np.ndarray, n: int) -> bool:
    """Whether every absent key of a batch gets a row at once: no counter, no eviction."""
    if len(table.counts) or (table.capacity is not None and len(table.rows) + n > table.capacity):
        return False
    return n == 0 or int(cnt.min()) >= table.admit_threshold


def lookup_admitting(table: DynamicTable, q: np.ndarray, cnt: np.ndarray) -> np.ndarray:
    """``DynamicTable.lookup`` in training when every absent key is admitted (see :func:`admits_all`).

    The same result as counting, admitting and inserting, in one probe of the index per
    key (:meth:`KeyMap.upsert`) instead of a lookup and then an insert.
    """
    rows = table.rows
    if table.eviction == "lru":
        if table.clock <= table.evictor.limit[0]:
            table.evictor.reset()
    elif len(cnt) and int(cnt.min()) < 0:
        table.evictor.reset()
    ids, created, reused = rows.upsert(q)
    scores = rows.cols["scores"].np
    new = ids[created]
    if table.eviction == "lru":
        scores[ids] = table.clock
    elif len(created) == len(q):
        scores[ids] = cnt
    else:
        if len(created):
            old = np.ones(len(q), dtype=bool)
            old[created] = False
            scores[ids[old]] += cnt[old]
        else:
            scores[ids] += cnt
        scores[new] = cnt[created]
    rows.touch(ids)
    if len(created):
        keys = q[created]
        if len(table.removed):
            back = table.removed.find(keys)
            table.removed.remove(back[back >= 0])
        values = rows.cols["values"].np
        if reused:
            write_init(keys, new, table.dim, table.seed, table.init_bound, values)
            rows.cols["opt"].np[new[:reused]] = 0.0  # fresh rows read zero already
        else:  # one run of fresh rows
            at = int(new[0])
            write_init(keys, None, table.dim, table.seed, table.init_bound, values[at : at + len(new)])
        table.evictor.created(new)
    return ids
