"""Pruning off the training thread: one coalescing worker on rank 0.

A pass lists the model_dir, asks the retention policies what to keep
(:func:`reckpt.policy.steps_to_delete`), never touches the best checkpoint while it is
known (:class:`reckpt.best.BestRule`), protected or leased steps (leases are re-read right
before each deletion), and deletes with :func:`reckpt.commit.removal.remove_checkpoint_dir`, so a
half-deleted checkpoint never looks committed. A failing pass is logged and the worker
lives on. The worker is a daemon thread: whoever owns the pruner calls :meth:`Pruner.close`
before the interpreter exits (the manager does so at exit too), or a pass may stop halfway.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from reckpt.best import BestRule
from reckpt.commit.leases import active_leases, remove_expired_leases
from reckpt.commit.removal import cleanup_stale, remove_checkpoint_dir
from reckpt.lifecycle.discovery import checkpoints_in
from reckpt.policy import CheckpointInfo, RetentionPolicy, steps_to_delete
from reckpt.storage.core import Storage

__all__ = ["Pruner"]

logger = logging.getLogger(__name__)


class Pruner:
    """Deletes what the retention policies do not keep, in a background thread.

    Args:
        model_dir: the run directory.
        storage: its storage (its owner's, with the owner's options: every listing and
            deletion of a pass goes through it).
        policies: retention policies (no policy: nothing is ever deleted).
        protected: returns steps that must survive this pass (save in flight, current best);
            may raise to abort the pass (nothing deleted).
        eval_result_filename: results file whose metrics feed best-N policies and ``best``.
        best: how the best checkpoint, kept by every pass, is told (default ``BestRule()``:
            the only metric recorded, else ``auc``).
    """

    def __init__(
        self,
        model_dir: str,
        storage: Storage,
        policies: Sequence[RetentionPolicy],
        protected: Callable[[], set[int]],
        eval_result_filename: str,
        best: BestRule | None = None,
    ) -> None:
        self.model_dir, self.storage = model_dir, storage
        self.policies = list(policies)
        self.protected = protected
        self.eval_result_filename = eval_result_filename
        self.best = best or BestRule()
        self._queue: queue.Queue[bool] = queue.Queue()
        self._pending = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.worker: threading.Thread | None = None  # the last worker started (kept after close)
        self.deleted: list[int] = []

    def plan(self) -> list[CheckpointInfo]:
        """The checkpoints a pass would delete now (nothing is deleted)."""
        if not self.policies:
            return []
        now = time.time()
        infos = checkpoints_in(
            self.storage, self.model_dir, eval_result_filename=self.eval_result_filename, with_size=False
        )
        keep = set(self.protected()) | set(active_leases(self.storage, self.model_dir, now))
        doomed = set(steps_to_delete(infos, self.policies, now=now, protected=keep, best=self.best))
        return [c for c in infos if c.step in doomed]

    def run_once(self) -> list[int]:
        """One pruning pass (synchronously); returns the deleted steps."""
        if not self.policies:
            return []
        now = time.time()
        by_step = {c.step: c.path for c in self.plan()}
        deleted = []
        for step in sorted(by_step, reverse=True):  # a delta goes before the links it needs
            if step in active_leases(self.storage, self.model_dir):
                continue  # leased since the pass began
            remove_checkpoint_dir(self.storage, by_step[step])
            logger.info("pruned %s", by_step[step])
            deleted.append(step)
        remove_expired_leases(self.storage, self.model_dir, now)
        cleanup_stale(self.storage, self.model_dir)
        self.deleted.extend(deleted)
        return deleted

    @property
    def running(self) -> bool:
        """Whether a worker is started (a pass may be queued or under way)."""
        return self._thread is not None

    def request(self) -> None:
        """Queue a pass (coalesced with one already queued); starts the worker lazily."""
        with self._lock:
            if self._pending:
                return
            self._pending = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="reckpt-prune", daemon=True)
                self._thread.start()
                self.worker = self._thread
        self._queue.put(True)

    def _work(self) -> None:
        while self._queue.get():
            with self._lock:
                self._pending = False  # a request arriving during this pass queues another
            try:
                self.run_once()
            except Exception as e:
                # One failed pass (a transient storage error, a garbled results file) must not
                # stop pruning for the rest of the run.
                logger.warning("pruning %s failed: %s", self.model_dir, e)

    def close(self) -> None:
        """Run what is queued, then stop the worker (idempotent; a later request starts a new one).

        Called on the worker itself (a finalizer run by garbage collection there), it only
        asks the worker to stop after its pass.
        """
        with self._lock:
            thread, self._thread = self._thread, None
            self._pending = False
        if thread is not None:
            self._queue.put(False)
            if thread is not threading.current_thread():
                thread.join()
