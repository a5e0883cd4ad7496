"""Exact comparisons of state: state dicts, optimizer states, shard lists, dynamic tables."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

TABLE_FIELDS = ("keys", "values", "opt_values", "scores", "counter_keys", "counter_freqs")
"""The fields of a dynamic table's ``TableState`` that a dump writes."""


def _same(x: Any, y: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y)
    if isinstance(x, list | tuple):
        return type(x) is type(y) and len(x) == len(y) and all(_same(a, b) for a, b in zip(x, y, strict=True))
    if isinstance(x, Mapping):
        return isinstance(y, Mapping) and not differing_keys(x, y)
    return bool(x == y)


def differing_keys(a: Mapping[Any, Any], b: Mapping[Any, Any]) -> list[str]:
    """Keys only one side has, and keys whose values differ: tensors bitwise (and in shape),
    lists, tuples and dicts element by element, anything else by ``==``."""
    return sorted(str(k) for k in a.keys() | b.keys() if k not in a or k not in b or not _same(a[k], b[k]))


def state_dicts_equal(a: Mapping[Any, Any], b: Mapping[Any, Any]) -> bool:
    """Exact (bitwise) equality of two state dicts (values: tensors, lists of shards, plain values)."""
    return not differing_keys(a, b)


def assert_state_dicts_equal(a: Mapping[Any, Any], b: Mapping[Any, Any]) -> None:
    """:func:`state_dicts_equal`, failing with the keys that differ."""
    diff = differing_keys(a, b)
    assert not diff, f"differ: {diff}"


def optim_states_equal(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    if sa["state"].keys() != sb["state"].keys():
        return False
    return all(state_dicts_equal(sa["state"][i], sb["state"][i]) for i in sa["state"])


def table_fields(state: Any) -> dict[str, torch.Tensor]:
    """A dynamic table's exported ``TableState`` as a dict of :data:`TABLE_FIELDS`."""
    return {f: getattr(state, f) for f in TABLE_FIELDS}
