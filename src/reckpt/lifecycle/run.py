"""A model_dir in a manager's care: its storage, background work, writer lock, retention, leases.

:class:`ManagedRun` is the half of :class:`reckpt.CheckpointManager` that is about the run's
resources rather than the content of its checkpoints: the run's one
:class:`~reckpt.storage.core.Storage` (created once from ``model_dir`` and ``storage_options``;
every save, sidecar, listing and prune pass of the run uses it), what runs between calls
(:class:`~reckpt.lifecycle.background.Background`: the async save, pruning), the writer lock,
retention, protection leases, and closing all of it. The manager adds what to save and when,
and restoring. Collective methods are called by every rank in lockstep; rank 0 alone prunes.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Self

from reckpt.commit.leases import lease
from reckpt.dist import Dist
from reckpt.errors import ConfigError
from reckpt.lifecycle.background import Background, SaveRecord
from reckpt.lifecycle.discovery import best_in, best_rule, checkpoints_in
from reckpt.naming import checkpoint_name
from reckpt.policy import CheckpointInfo, LatestN, RetentionPolicy
from reckpt.storage.core import Storage, storage_for

__all__ = ["ManagedRun"]


class ManagedRun:
    """The resources of one run (see the module doc); :class:`reckpt.CheckpointManager` is one.

    The constructor does no I/O: it opens the storage object, which connects lazily. Its
    arguments are the manager's, which documents them.

    Raises:
        ConfigError: ``keep_checkpoint_max`` is negative, or ``async_snapshot`` is unknown,
            or ``model_dir``'s scheme has no storage backend.
    """

    def __init__(
        self,
        model_dir: str,
        keep_checkpoint_max: int,
        export_config: Any,
        eval_result_filename: str,
        retention: Sequence[RetentionPolicy] | None,
        async_snapshot: str,
        storage_options: Mapping[str, Any] | None,
        process_group: Any,
    ) -> None:
        if keep_checkpoint_max < 0:
            raise ConfigError(f"keep_checkpoint_max must be >= 0, got {keep_checkpoint_max}")
        self.model_dir = model_dir.rstrip("/") or model_dir
        self.export_config = export_config
        self.eval_result_filename = eval_result_filename
        self.storage_options = dict(storage_options or {})
        self._storage = storage_for(self.model_dir, self.storage_options)  # the run's one storage
        self._pg = process_group
        if retention is not None:
            policies = list(retention)
        else:
            policies = [LatestN(keep_checkpoint_max)] if keep_checkpoint_max > 0 else []
        self._bg = Background(
            self.model_dir,
            self._storage,
            process_group,
            policies,
            best_rule(export_config),
            eval_result_filename,
            async_snapshot,
        )
        self._saver = self._bg.saver
        # Closes what close() would when the manager is collected or the interpreter exits
        # without close(); it holds the Background only, never the manager.
        self._finalizer = weakref.finalize(self, self._bg.drain_at_exit)
        self._locked = False  # the writer lock was taken (start()); the same on every rank

    def checkpoint_dir(self, step: int) -> str:
        return Storage.join(self.model_dir, checkpoint_name(step))

    def best_checkpoint(self) -> tuple[str | None, int]:
        return best_in(self._storage, self.model_dir, self.export_config, self.eval_result_filename)

    def list_checkpoints(self) -> list[CheckpointInfo]:
        return checkpoints_in(self._storage, self.model_dir, eval_result_filename=self.eval_result_filename)

    def take_saves(self) -> list[SaveRecord]:
        """Rank 0: the saves committed since the last call (path, size, timings, tier), oldest first.

        An asynchronous save appears once its background write committed. Other ranks get ``[]``.
        """
        return self._bg.take_saves()

    def start(self) -> None:
        """Collective: take the model_dir's writer lock now (idempotent; a save takes it anyway).

        Call it when training starts, so that a second job writing into the same model_dir
        stops at once instead of at its first save. Rank 0 takes the lock; every rank raises
        :class:`~reckpt.commit.writer_lock.ModelDirLockedError` when another live job holds it.
        """
        if self._locked:
            return  # held since an earlier call (on rank 0; every rank knows): no collective
        err: BaseException | None = None
        try:
            self._bg.take_lock()
        except Exception as e:
            err = e
        Dist(self._pg).raise_if_any(err, f"locking {self.model_dir}")
        self._locked = True

    def wait(self) -> None:
        """Block until the async save in flight is committed; raise its failure."""
        self._saver.wait()

    def _arm(self) -> None:
        if not self._finalizer.alive:  # run by hand (TorchEasyRec's tests do): re-arm for exit
            self._finalizer = weakref.finalize(self, self._bg.drain_at_exit)
            self._locked = False  # the drain released the writer lock

    # -- retention ---------------------------------------------------------------------
    def prune(self) -> None:
        """Rank 0: queue a pruning pass on the background worker (no-op without policies)."""
        self._arm()
        self._bg.prune()

    def lease(self, checkpoint_dir: str, *, ttl_s: float = 600.0, holder: str = "") -> Any:
        """Context manager holding a checkpoint against pruning (see :func:`reckpt.commit.leases.lease`)."""
        return lease(checkpoint_dir, ttl_s=ttl_s, holder=holder, storage_options=self.storage_options)

    def protect_checkpoint(self, path: str) -> None:
        """TorchEasyRec's ``protect_checkpoint``: hold a lease until :meth:`unprotect_checkpoint`."""
        key = path.rstrip("/")
        self._bg.protect(key, self.lease(key, holder="protect_checkpoint"))

    def unprotect_checkpoint(self, path: str) -> None:
        self._bg.unprotect(path.rstrip("/"))

    def close(self) -> None:
        """Wait for the async save, drain pruning, release protections and the lock (idempotent).

        Raises the background save's failure, if any, after everything is drained.
        """
        self._locked = False  # released below; a later save takes it again
        self._bg.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _prune_worker(self) -> threading.Thread | None:  # TorchEasyRec's private name
        return None if self._bg.pruner is None else self._bg.pruner.worker
