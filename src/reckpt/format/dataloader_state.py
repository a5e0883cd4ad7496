"""``dataloader_state.json``: the data position, merged across ranks (TorchEasyRec layout).

Keys containing ``:`` are per-source positions (``"<path>:<range_start>"`` -> last
consumed row, ``"<topic>:<partition>"`` -> offset); keys without one are reserved
(``__epochs_completed__``, ``__data_ts_watermark__``, and reckpt's ``__world_size__``: the
number of processes whose reader wrote the positions). Ranks' states merge key-wise
with ``max``.

A checkpoint is immutable once written (a reckpt one's manifest checksums every file), so a
newer state for it (an end of pass after its save) goes into its ``dataloader_state``
sidecar, which :func:`restore_dataloader_state` prefers; a folder that is not a checkpoint
gets the plain file, as TorchEasyRec writes it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from reckpt.commit.state import checkpoint_state
from reckpt.format.manifest import read_json_object, read_sidecar, write_sidecar
from reckpt.naming import DATALOADER_STATE_FILE
from reckpt.storage.core import Storage, storage_for

DATALOADER_STATE_SIDECAR = "dataloader_state"
# TorchEasyRec's names for the file and its reserved keys (no ":", so per-source consumers
# skip them): completed data passes, and the event time of the data at the save (Unix s).
DATALOADER_CKPT_FILENAME = DATALOADER_STATE_FILE
EPOCHS_COMPLETED = "__epochs_completed__"
DATA_TS_WATERMARK = "__data_ts_watermark__"
# reckpt's own reserved key (TorchEasyRec ignores keys without ":"): the number of processes
# that read the data when the positions were written, so a resume on another number knows
# to re-divide what is left (the trainer's reader, docs/data.md).
DATA_WORLD_SIZE = "__world_size__"

__all__ = [
    "DATALOADER_CKPT_FILENAME",
    "DATA_TS_WATERMARK",
    "DATA_WORLD_SIZE",
    "EPOCHS_COMPLETED",
    "merge_dataloader_states",
    "update_dataloader_state",
    "update_dataloder_state",
    "save_dataloader_state",
    "restore_dataloader_state",
    "write_dataloader_state",
    "read_dataloader_state",
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


def save_dataloader_state(
    checkpoint_dir: str,
    dataloader_state: Mapping[str, Any],
    *,
    storage_options: Mapping[str, Any] | None = None,
    process_group: Any = None,
) -> None:
    """Collective: merge every rank's state (per-key max); rank 0 writes it for ``checkpoint_dir``.

    Every rank passes its own state and returns once rank 0 has written the merged one (a
    failure there is raised on every rank). Into a reckpt checkpoint (committed) or a
    TorchEasyRec one (legacy) it goes as the ``dataloader_state`` sidecar, so the checkpoint
    itself is never changed (a reckpt one still verifies); into any other folder (created
    when missing) as a plain ``dataloader_state.json``. :func:`restore_dataloader_state`
    returns it either way.

    Args:
        checkpoint_dir: the checkpoint (or plain) folder.
        dataloader_state: this rank's ``{source_key: position}`` (and reserved keys).
        storage_options: fsspec options for URLs.
        process_group: the group to merge over (default: the default group, if any).

    Example:
        >>> # save_dataloader_state("run/model.ckpt-100", {"/data/a.parquet:0": 499})
    """
    storage = storage_for(checkpoint_dir, storage_options)
    write_dataloader_state(storage, checkpoint_dir, dataloader_state, process_group=process_group)


def write_dataloader_state(
    storage: Storage,
    checkpoint_dir: str,
    dataloader_state: Mapping[str, Any],
    *,
    process_group: Any = None,
) -> None:
    """Collective: :func:`save_dataloader_state` on an open storage (every rank passes its state,
    rank 0 writes the merged one, every rank raises rank 0's failure)."""
    from reckpt.dist import Dist  # torch.distributed: only when saving

    d = Dist(process_group)
    merged = merge_dataloader_states(d.all_gather(dict(dataloader_state)))
    error: Exception | None = None
    if d.is_coordinator:
        try:
            _write(storage, checkpoint_dir.rstrip("/"), merged)
        except Exception as e:
            if not d.active:
                raise
            error = e
    d.raise_if_any(error, f"writing the dataloader state of {checkpoint_dir}")


def _write(storage: Storage, path: str, state: dict[str, Any]) -> None:
    if checkpoint_state(storage, path) in ("committed", "legacy"):
        write_sidecar(storage, path, DATALOADER_STATE_SIDECAR, state)
    else:
        storage.makedirs(path)
        storage.write_bytes_atomic(Storage.join(path, DATALOADER_STATE_FILE), encode_dataloader_state(state))


def restore_dataloader_state(
    checkpoint_dir: str, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The checkpoint's dataloader state, or ``None`` when it has none.

    A ``dataloader_state`` sidecar (written when a later end-of-pass refreshed the state of an
    already committed checkpoint) takes precedence over ``dataloader_state.json``.

    Raises:
        IntegrityError: the file is not a JSON object, or the sidecar is corrupt.
    """
    return read_dataloader_state(storage_for(checkpoint_dir, storage_options), checkpoint_dir)


def read_dataloader_state(storage: Storage, checkpoint_dir: str) -> dict[str, Any] | None:
    """:func:`restore_dataloader_state` on an open storage."""
    refreshed = read_sidecar(storage, checkpoint_dir, DATALOADER_STATE_SIDECAR)
    if refreshed is not None:
        return refreshed
    return read_json_object(storage, Storage.join(checkpoint_dir, DATALOADER_STATE_FILE))
