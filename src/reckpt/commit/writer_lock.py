"""One writer per model_dir: a lock record naming its owner, with a heartbeat.

The first save of a :class:`~reckpt.lifecycle.manager.CheckpointManager` takes
``<model_dir>/.reckpt-lock.json`` (host, pid, start time, heartbeat); a second job saving into
the same model_dir refuses with a message naming the owner. A lock whose owner is gone (same
host and the pid is dead, or no heartbeat for ``stale_after_s``) is taken over. Readers
(eval, export) take no lock; they hold leases instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from reckpt.commit.state import STALE_AFTER_S, heartbeat, is_stale, new_token, pid_alive
from reckpt.errors import CheckpointError
from reckpt.storage.core import Storage

__all__ = ["LOCK_FILE", "ModelDirLockedError", "model_dir_lock"]

LOCK_FILE = ".reckpt-lock.json"


class ModelDirLockedError(CheckpointError, RuntimeError):
    """Another live job is saving into this model_dir."""


@dataclass(frozen=True, slots=True)
class _Owner:
    host: str
    pid: int
    token: str
    started_at: float
    heartbeat_at: float

    def render(self, now: float) -> bytes:
        return json.dumps(asdict(_Owner(self.host, self.pid, self.token, self.started_at, now))).encode()


def _read(storage: Storage, path: str) -> _Owner | None:
    try:
        return _Owner(**json.loads(storage.read_text(path)))
    except (OSError, ValueError, TypeError):
        return None


@contextlib.contextmanager
def model_dir_lock(
    storage: Storage, model_dir: str, *, stale_after_s: float = STALE_AFTER_S
) -> Iterator[None]:
    """Hold the model_dir's writer lock until exit (rank 0 only).

    Raises:
        ModelDirLockedError: a live job holds it (the message names host, pid and start time).
    """
    path = Storage.join(model_dir, LOCK_FILE)
    me = _Owner(socket.gethostname(), os.getpid(), new_token(), time.time(), time.time())
    current = _read(storage, path)
    if current is not None and not is_stale(
        current, now=time.time(), host=me.host, pid_alive=pid_alive, stale_after_s=stale_after_s
    ):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(current.started_at))
        raise ModelDirLockedError(
            f"{model_dir} is being written by another job (host {current.host}, pid {current.pid},"
            f" started {started}); two jobs must not save into one model_dir. Stop that job or use another"
            f" --model-dir; a lock left by a dead job is taken over automatically after {stale_after_s:.0f}s"
        )
    storage.makedirs(model_dir)
    with heartbeat(storage, path, me.render):
        # On object stores two jobs may race past the check: the later write wins, and the
        # loser finds out here instead of silently interleaving checkpoints.
        held = _read(storage, path)
        if held is not None and held.token != me.token:
            raise ModelDirLockedError(
                f"{model_dir}: lost the writer lock to host {held.host}, pid {held.pid}"
            )
        try:
            yield
        finally:
            held = _read(storage, path)
            if held is not None and held.token == me.token:
                storage.rm(path)
