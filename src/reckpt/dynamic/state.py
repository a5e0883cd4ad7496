"""What a dump of a dynamic table holds, and the array helpers that move it in and out.

:class:`TableState` is a copy of (part of) a table sorted by key: what ``export`` returns, an
incremental dump writes and ``apply`` reads. The helpers below are the batch steps of
``DynamicTable.export`` and ``DynamicTable.apply``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from reckpt.dynamic.index import KeyMap

__all__ = [
    "TableState",
    "as_np",
    "as_run",
    "ids_for",
    "last_of_each",
    "present",
    "put_rows",
    "take",
]


@dataclass
class TableState:
    """A copy of (part of) a table, sorted by key: what a dump writes and a load reads."""

    keys: torch.Tensor
    values: torch.Tensor
    opt_values: torch.Tensor
    scores: torch.Tensor
    counter_keys: torch.Tensor
    counter_freqs: torch.Tensor
    removed_keys: torch.Tensor | None = None


def as_np(t: torch.Tensor | np.ndarray, dtype: Any = np.int64) -> np.ndarray:
    arr = t.numpy() if isinstance(t, torch.Tensor) else t
    return np.ascontiguousarray(arr, dtype=dtype)


def last_of_each(keys: np.ndarray) -> np.ndarray | None:
    """``None`` when ``keys`` ascend strictly (the usual dump), else the positions of the distinct
    keys in key order, the last occurrence of a repeated key (it would overwrite the earlier)."""
    if len(keys) < 2 or bool(np.all(keys[1:] > keys[:-1])):
        return None
    _, first_of_reversed = np.unique(keys[::-1], return_index=True)
    out: np.ndarray = len(keys) - 1 - first_of_reversed
    return out


def present(m: KeyMap, keys: np.ndarray) -> np.ndarray:
    """Ids of those of (distinct) ``keys`` that ``m`` holds."""
    ids = m.find(keys)
    return ids[ids >= 0]


def ids_for(m: KeyMap, keys: np.ndarray) -> np.ndarray:
    """Ids of distinct ``keys`` in ``m``, adding the missing ones."""
    if not len(m):
        return m.add(keys)
    ids = m.find(keys)
    miss = ids < 0
    if miss.any():
        ids[miss] = m.add(keys[miss])
    return ids


def as_run(ids: np.ndarray) -> np.ndarray | slice:
    """``ids`` as a slice when they are one ascending run (a copy instead of a scatter)."""
    if len(ids) and ids[-1] - ids[0] == len(ids) - 1 and bool(np.all(ids[1:] > ids[:-1])):
        return slice(int(ids[0]), int(ids[0]) + len(ids))
    return ids


def take(src: np.ndarray, pick: np.ndarray | None) -> np.ndarray:
    return src if pick is None else src[pick]


def put_rows(col: np.ndarray, ids: np.ndarray | slice, src: np.ndarray, pick: np.ndarray | None) -> None:
    """``col[ids] = src[pick]``."""
    col[ids] = take(src, pick)
