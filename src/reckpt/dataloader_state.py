"""``dataloader_state.json``: the data position, merged across ranks (TorchEasyRec layout).

Keys containing ``:`` are per-source positions (``"<path>:<range_start>"`` -> last
consumed row, ``"<topic>:<partition>"`` -> offset); keys without one are reserved
(``__epochs_completed__``, ``__data_ts_watermark__``). Ranks' states merge key-wise
with ``max``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from reckpt.manifest import read_json_object, read_sidecar
from reckpt.naming import DATALOADER_STATE_FILE
from reckpt.storage import Storage, storage_for

DATALOADER_STATE_SIDECAR = "dataloader_state"

__all__ = [
    "merge_dataloader_states",
    "update_dataloader_state",
    "update_dataloder_state",
    "restore_dataloader_state",
]


def merge_dataloader_states(states: Iterable[Mapping[str, Any] | None]) -> dict[str, Any]:
    """Key-wise ``max`` of several ranks' states (``None`` entries are skipped)."""
    merged: dict[str, Any] = {}
    for state in states:
        for key, value in (state or {}).items():
            merged[key] = value if key not in merged else max(merged[key], value)
    return merged


def update_dataloader_state(state: dict[str, Any], info: Mapping[str, Any] | None) -> None:
    """Merge one batch's ``{key: row}`` into ``state`` in place (per-key max; ``None`` is a no-op)."""
    if info:
        state.update(merge_dataloader_states([state, info]))


update_dataloder_state = update_dataloader_state  # TorchEasyRec's spelling, kept for porting


def encode_dataloader_state(state: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(state), indent=2).encode("utf-8")


def restore_dataloader_state(
    checkpoint_dir: str, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The checkpoint's dataloader state, or ``None`` when it has none.

    A ``dataloader_state`` sidecar (written when a later end-of-pass refreshed the state of an
    already committed checkpoint) takes precedence over ``dataloader_state.json``.

    Raises:
        IntegrityError: the file is not a JSON object, or the sidecar is corrupt.
    """
    storage = storage_for(checkpoint_dir, storage_options)
    refreshed = read_sidecar(storage, checkpoint_dir, DATALOADER_STATE_SIDECAR)
    if refreshed is not None:
        return refreshed
    return read_json_object(storage, Storage.join(checkpoint_dir, DATALOADER_STATE_FILE))
