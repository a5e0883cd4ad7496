"""Dynamic (hash-keyed, growing) embedding tables and their ``dynamicemb/`` persistence.

Example:
    >>> from reckpt.dynamic import DynamicEmbedding
    >>> emb = DynamicEmbedding(8, name="user", capacity=100_000, eviction="lfu")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from reckpt._lazy import lazy_exports

_EXPORTS = {
    "DynamicEmbedding": "reckpt.dynamic.module",
    "DynamicLoadReport": "reckpt.dynamic.load",
    "PendingDynamicLoad": "reckpt.dynamic.load",
    "dynamic_tables": "reckpt.dynamic.dump",
    "dynamic_writer": "reckpt.dynamic.dump",
    "load_dynamic": "reckpt.dynamic.load",
    "prepare_dynamic": "reckpt.dynamic.load",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from reckpt.dynamic.dump import dynamic_tables as dynamic_tables
    from reckpt.dynamic.dump import dynamic_writer as dynamic_writer
    from reckpt.dynamic.load import DynamicLoadReport as DynamicLoadReport
    from reckpt.dynamic.load import PendingDynamicLoad as PendingDynamicLoad
    from reckpt.dynamic.load import load_dynamic as load_dynamic
    from reckpt.dynamic.load import prepare_dynamic as prepare_dynamic
    from reckpt.dynamic.module import DynamicEmbedding as DynamicEmbedding
