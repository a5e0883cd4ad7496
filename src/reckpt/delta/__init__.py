"""Delta checkpoints: only the embedding rows that changed since the last save.

:func:`save_delta` writes a ``model.delta-<step>`` on top of a full checkpoint; a
:class:`RowTracker` records the touched rows; :class:`IncrementalPolicy` tells the manager
when to write a delta and when a full checkpoint. ``restore_model`` on a delta replays its
chain (:mod:`reckpt.restore.chain`).

Example:
    >>> from reckpt.delta import IncrementalPolicy
    >>> IncrementalPolicy(full_every=4).full_every
    4
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from reckpt._lazy import lazy_exports

_EXPORTS = {
    "save_delta": "reckpt.delta.save",
    "RowTracker": "reckpt.delta.row_tracker",
    "IncrementalPolicy": "reckpt.policy",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from reckpt.delta.row_tracker import RowTracker as RowTracker
    from reckpt.delta.save import save_delta as save_delta
    from reckpt.policy import IncrementalPolicy as IncrementalPolicy
