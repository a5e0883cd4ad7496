"""Dynamic (hash-keyed, growing) embedding tables and their ``dynamicemb/`` persistence.

Example:
    >>> from reckpt.dynamic import DynamicEmbedding
    >>> emb = DynamicEmbedding(8, name="user", capacity=100_000, eviction="lfu")
"""

from __future__ import annotations

from reckpt.dynamic.dump import dynamic_tables, dynamic_writer
from reckpt.dynamic.load import DynamicLoadReport, PendingDynamicLoad, load_dynamic, prepare_dynamic
from reckpt.dynamic.module import DynamicEmbedding

__all__ = [
    "DynamicEmbedding",
    "DynamicLoadReport",
    "PendingDynamicLoad",
    "dynamic_tables",
    "dynamic_writer",
    "load_dynamic",
    "prepare_dynamic",
]
