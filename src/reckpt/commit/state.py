"""The commit protocol: a checkpoint is visible only when complete.

**One predicate.** :func:`checkpoint_state` (and its boolean form :func:`is_committed`)
decides what counts as a checkpoint, for discovery, retention, restore and the CLI:

=================================================  =============
directory content                                  state
=================================================  =============
deletion marker ``.reckpt-deleting``               incomplete (being deleted)
``reckpt.json`` (the manifest)                     committed
in-progress marker, no manifest                    incomplete
no marker, no manifest, ``model/.metadata``        legacy (committed TorchEasyRec checkpoint)
anything else                                      incomplete (or absent)
=================================================  =============

**POSIX filesystems** (atomic rename): all ranks write into a staging sibling
``.reckpt-staging.<token>`` (holding an owner record), data is fsynced, and after a
barrier rank 0 writes the manifest, fsyncs, and renames the staging directory to
``model.ckpt-<step>``. **Object stores** (no atomic rename): rank 0 first writes the
in-progress marker ``.reckpt-in-progress`` (holding the owner record) into the target,
all ranks write, and rank 0 writes the manifest last, then removes the marker.
Deleting a checkpoint on an object store writes the deletion marker first, then removes the
manifest, the other files, and the marker last.

Deleting and replacing checkpoints, and cleaning up after crashed saves, live in
:mod:`reckpt.commit.removal`, which deletes only what reckpt wrote.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

from reckpt.errors import IntegrityError
from reckpt.naming import (
    DCP_METADATA_FILE,
    DELETING_MARKER,
    IN_PROGRESS_MARKER,
    MANIFEST_FILE,
    MODEL_DIR,
)
from reckpt.storage.core import Storage, storage_for

__all__ = [
    "CheckpointState",
    "OwnerRecord",
    "checkpoint_state",
    "is_committed",
    "is_stale",
    "heartbeat",
    "new_token",
]

CheckpointState = Literal["committed", "legacy", "incomplete", "absent"]

HEARTBEAT_INTERVAL_S = 10.0
STALE_AFTER_S = 300.0


def new_token() -> str:
    """A random hex token for staging and trash names."""
    return uuid.uuid4().hex[:16]


def checkpoint_state(storage: Storage, path: str) -> CheckpointState:
    """The commit state of a checkpoint directory (see the module table)."""
    if storage.exists(Storage.join(path, DELETING_MARKER)):
        return "incomplete"
    if storage.exists(Storage.join(path, MANIFEST_FILE)):
        return "committed"
    if not storage.isdir(path):
        return "absent"
    if storage.exists(Storage.join(path, IN_PROGRESS_MARKER)):
        return "incomplete"
    if storage.exists(Storage.join(path, MODEL_DIR, DCP_METADATA_FILE)):
        return "legacy"
    return "incomplete"


def is_committed(
    path: str, storage_options: dict[str, object] | None = None, *, storage: Storage | None = None
) -> bool:
    """Whether ``path`` is a complete checkpoint (reckpt-committed or legacy TorchEasyRec).

    Example:
        >>> is_committed("memory://nowhere/model.ckpt-1")
        False
    """
    st = storage or storage_for(path, storage_options)
    return checkpoint_state(st, path) in ("committed", "legacy")


@dataclass(frozen=True, slots=True)
class OwnerRecord:
    """Who is writing a staging area, so a later cleanup can tell live from dead."""

    host: str
    pid: int
    token: str
    target: str
    started_at: float
    heartbeat_at: float
    members: tuple[str, ...] = ()  # top-level names the writer writes into ``target``

    @classmethod
    def mine(cls, token: str, target: str, now: float, members: Iterable[str] = ()) -> OwnerRecord:
        return cls(socket.gethostname(), os.getpid(), token, target, now, now, tuple(sorted(members)))

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode("utf-8")

    def render(self, now: float) -> bytes:
        """The record with its heartbeat set to ``now``, as JSON."""
        return dataclasses.replace(self, heartbeat_at=now).to_json()

    @classmethod
    def from_json(cls, data: bytes) -> OwnerRecord:
        doc = json.loads(data.decode("utf-8"))
        return cls(
            str(doc["host"]),
            int(doc["pid"]),
            str(doc["token"]),
            str(doc["target"]),
            float(doc["started_at"]),
            float(doc["heartbeat_at"]),
            tuple(str(m) for m in doc.get("members", ())),
        )


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(
    owner: Any,
    *,
    now: float,
    host: str,
    pid_alive: Callable[[int], bool],
    stale_after_s: float = STALE_AFTER_S,
) -> bool:
    """Whether a staging area's writer is gone (pure).

    Examples:
        ============================================  =======
        owner                                         stale
        ============================================  =======
        unreadable / missing record                   True only if older than ``stale_after_s``
        same host, pid not alive                      True
        heartbeat older than ``stale_after_s``        True
        otherwise                                     False
        ============================================  =======

    A missing record is judged by the caller with the directory's age; here ``None`` is stale.
    """
    if owner is None:
        return True
    if owner.host == host and not pid_alive(owner.pid):
        return True
    return bool(now - owner.heartbeat_at > stale_after_s)


@contextlib.contextmanager
def heartbeat(
    storage: Storage, path: str, render: Callable[[float], bytes], interval_s: float = HEARTBEAT_INTERVAL_S
) -> Iterator[None]:
    """Write ``render(now)`` to ``path`` now and again every ``interval_s`` until exit.

    Used for owner records of saves in progress and for leases (whose expiry moves forward).
    """
    storage.write_bytes(path, render(time.time()), fsync=False)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval_s):
            # A transient storage error must not kill the beat; the next one retries.
            with contextlib.suppress(OSError):
                storage.write_bytes(path, render(time.time()), fsync=False)

    thread = threading.Thread(target=beat, name="reckpt-heartbeat", daemon=True)
    try:
        thread.start()
        started = True
    except RuntimeError:
        # An async save finishing while the interpreter shuts down (a manager never closed)
        # cannot start threads on Python 3.12.0-3.12.2: the record written above stands.
        started = False
    try:
        yield
    finally:
        stop.set()
        if started:
            thread.join()


def read_owner(storage: Storage, path: str) -> OwnerRecord | None:
    try:
        return OwnerRecord.from_json(storage.read_bytes(path))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def verify_owner_token(storage: Storage, record_path: str, token: str) -> None:
    """Raise when another save took over a staging area or target (concurrent writers)."""
    owner = read_owner(storage, record_path)
    if owner is not None and owner.token != token:
        raise IntegrityError(
            f"{record_path}: another save (host {owner.host}, pid {owner.pid}) is writing this"
            " checkpoint; two jobs must not save the same step into one model_dir"
        )
