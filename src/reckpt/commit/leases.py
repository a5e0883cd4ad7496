"""Leases: on-disk records that keep a checkpoint from being pruned while someone reads it.

A lease is a small JSON file ``<model_dir>/.reckpt-leases/<step>.<token>.json`` with an
expiry, so a separate process (an evaluation, an export) can hold one, also on ``s3://``,
and a dead reader cannot pin a checkpoint forever. While a :func:`lease` context is open,
a background thread moves the expiry forward; pruning skips leased steps and removes
expired records.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from reckpt.commit.state import checkpoint_state, heartbeat, new_token
from reckpt.errors import CheckpointNotFoundError, ConfigError
from reckpt.naming import parse_any_step
from reckpt.storage.core import Storage, storage_for

__all__ = ["LEASE_DIR", "LeaseRecord", "lease", "active_leases", "remove_expired_leases"]

LEASE_DIR = ".reckpt-leases"
_LEASE_RE = re.compile(r"(0|[1-9][0-9]*)\.([0-9a-f]+)\.json")


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """Who holds a checkpoint, until when."""

    step: int
    token: str
    holder: str
    host: str
    pid: int
    expires_at: float

    def render(self, ttl_s: float) -> Any:
        def at(now: float) -> bytes:
            rec = LeaseRecord(self.step, self.token, self.holder, self.host, self.pid, now + ttl_s)
            return json.dumps(asdict(rec)).encode("utf-8")

        return at


def _split(checkpoint_dir: str) -> tuple[str, int]:
    path = checkpoint_dir.rstrip("/")
    step = parse_any_step(path)
    if step is None:
        raise ConfigError(f"{checkpoint_dir}: a lease needs a checkpoint path named model.ckpt-<step>")
    return Storage.parent(path), step


@contextlib.contextmanager
def lease(
    checkpoint_dir: str,
    *,
    ttl_s: float = 600.0,
    holder: str = "",
    storage_options: Mapping[str, Any] | None = None,
) -> Iterator[LeaseRecord]:
    """Hold a checkpoint so that pruning leaves it alone until the block exits.

    The lease is renewed every ``ttl_s / 3`` seconds while held; if the holder dies, it
    expires ``ttl_s`` seconds after the last renewal.

    Raises:
        CheckpointNotFoundError: the checkpoint is not committed (it may just have been pruned).

    Example:
        >>> # with lease("run/model.ckpt-100", holder="eval"):
        >>> #     restore_model("run/model.ckpt-100", model)
    """
    if ttl_s <= 0:
        raise ConfigError(f"lease ttl_s must be > 0, got {ttl_s}")
    model_dir, step = _split(checkpoint_dir)
    storage = storage_for(model_dir, storage_options)
    rec = LeaseRecord(step, new_token(), holder or "reader", socket.gethostname(), os.getpid(), 0.0)
    path = Storage.join(model_dir, LEASE_DIR, f"{step}.{rec.token}.json")
    with heartbeat(storage, path, rec.render(ttl_s), interval_s=ttl_s / 3):
        try:
            # Checked after the record exists: a pruner that has not deleted the checkpoint
            # by now will see the lease before it does.
            if checkpoint_state(storage, checkpoint_dir.rstrip("/")) not in (
                "committed",
                "legacy",
            ):
                raise CheckpointNotFoundError(f"{checkpoint_dir}: no committed checkpoint to lease")
            yield rec
        finally:
            storage.rm(path)


def _records(storage: Storage, model_dir: str) -> list[tuple[str, LeaseRecord | None]]:
    out: list[tuple[str, LeaseRecord | None]] = []
    lease_dir = Storage.join(model_dir, LEASE_DIR)
    for name in storage.ls(lease_dir):
        if not _LEASE_RE.fullmatch(name):
            continue
        path = Storage.join(lease_dir, name)
        try:
            doc = json.loads(storage.read_text(path))
            out.append((path, LeaseRecord(**doc)))
        except (OSError, ValueError, TypeError):
            out.append((path, None))
    return out


def active_leases(storage: Storage, model_dir: str, now: float | None = None) -> dict[int, list[LeaseRecord]]:
    """Step -> unexpired leases on it."""
    now = time.time() if now is None else now
    out: dict[int, list[LeaseRecord]] = {}
    for _, rec in _records(storage, model_dir):
        if rec is not None and rec.expires_at > now:
            out.setdefault(rec.step, []).append(rec)
    return out


def remove_expired_leases(storage: Storage, model_dir: str, now: float | None = None) -> int:
    """Delete expired lease records (rank 0 / the pruner); returns how many."""
    now = time.time() if now is None else now
    removed = 0
    for path, rec in _records(storage, model_dir):
        if rec is not None and rec.expires_at <= now:
            storage.rm(path)
            removed += 1
    return removed
