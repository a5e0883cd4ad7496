"""Known-bad checkpoints: a sidecar records that a checkpoint failed verification.

A checkpoint whose files fail their checksums (or whose metadata is refused) is marked with
a ``reckpt.damaged.sidecar.json`` sidecar naming the problems; its files are not touched, so
``--no-verify`` can still salvage what is readable. Discovery then reports it as
``damaged``: it is never ``latest`` or ``best``, it does not count toward retention's "keep
the N newest", and pruning deletes it before any good checkpoint. A new save of its step
replaces it (the sidecar is reckpt's own and goes with it). ``reckpt verify`` clears the
mark of a checkpoint that verifies again.
"""

from __future__ import annotations

import contextlib
import time

from reckpt.format.manifest import write_sidecar
from reckpt.naming import sidecar_name
from reckpt.storage.core import Storage

__all__ = ["DAMAGED", "mark_damaged", "clear_damaged", "is_marked_damaged"]

DAMAGED = "damaged"
_MAX_PROBLEMS = 20


def mark_damaged(storage: Storage, checkpoint_dir: str, problems: list[str]) -> None:
    """Rank 0: record that ``checkpoint_dir`` failed verification (best effort: never raises OSError)."""
    payload = {"problems": problems[:_MAX_PROBLEMS], "marked_at": time.time()}
    with contextlib.suppress(OSError):
        write_sidecar(storage, checkpoint_dir, DAMAGED, payload)


def clear_damaged(storage: Storage, checkpoint_dir: str) -> None:
    """Rank 0: drop the mark (the checkpoint verified again)."""
    with contextlib.suppress(OSError):
        storage.rm(Storage.join(checkpoint_dir, sidecar_name(DAMAGED)))


def is_marked_damaged(storage: Storage, checkpoint_dir: str) -> bool:
    """Whether the checkpoint carries the damaged mark."""
    return storage.exists(Storage.join(checkpoint_dir, sidecar_name(DAMAGED)))
