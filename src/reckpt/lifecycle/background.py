"""What a :class:`~reckpt.CheckpointManager` leaves running between calls, and draining it.

Between two calls a manager may hold: an async save in flight (a thread that writes and
commits), a queued prune pass (a thread on rank 0), the model_dir's writer lock and the
leases of ``protect_checkpoint`` (heartbeat threads). All are daemon threads, which
Python stops wherever they are at interpreter exit: a queued prune would be lost (or stop
between renaming a checkpoint to trash and deleting it), a save would leave its staging
directory, the lock would stay behind.

:class:`Background` owns all of them and holds no reference to its manager (the save and
prune threads call back into it, never into the manager), so the manager registers
``weakref.finalize(manager, background.drain_at_exit)``: when a manager that was never
closed is garbage-collected, or the interpreter exits, the save in flight is finished and
committed, queued pruning runs, the lock and leases are released, with a warning.

Rank 0 also keeps a :class:`SaveRecord` of every save it commits (size, stall, total time,
throughput, tier), for a training loop to log: :meth:`Background.take_saves`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reckpt.best import BestRule
from reckpt.commit.state import checkpoint_state
from reckpt.commit.writer_lock import model_dir_lock
from reckpt.dist import Dist
from reckpt.format.eval_results import append_eval_result, write_checkpoint_metrics
from reckpt.format.manifest import read_manifest
from reckpt.lifecycle.pruner import Pruner
from reckpt.naming import parse_any_step
from reckpt.policy import RetentionPolicy
from reckpt.save.async_saver import AsyncSaver
from reckpt.save.contents import CheckpointWrite, SaveContents
from reckpt.save.host_copy import stage_state_dict
from reckpt.save.pipeline import write_checkpoint
from reckpt.storage.core import Storage

__all__ = ["Background", "SaveRecord"]

logger = logging.getLogger(__name__)

SAVE_RECORDS_KEPT = 1000
"""Records :meth:`Background.take_saves` can hand out at most (older ones are dropped)."""


@dataclass(frozen=True, slots=True)
class SaveRecord:
    """One committed save, as rank 0 saw it.

    Attributes:
        path: the checkpoint (``model.ckpt-<step>`` or ``model.delta-<step>``).
        step: its step (``None`` for a directory not named by step).
        bytes: bytes written: the sizes its manifest records (``0`` when it has none).
        stall_s: how long the caller was blocked (all of ``seconds`` for a synchronous save).
        seconds: from the call to the commit.
        is_async: written in the background.
        tier: where it went: ``"disk"`` (the model_dir) unless tiers are configured.
    """

    path: str
    step: int | None
    bytes: int
    stall_s: float
    seconds: float
    is_async: bool
    tier: str = "disk"

    @property
    def gbps(self) -> float:
        """Throughput of the whole save, in GB/s (10^9 bytes)."""
        return self.bytes / 1e9 / max(self.seconds, 1e-9)


class Background:
    """A manager's async saver, pruner, writer lock and protection leases.

    Args:
        model_dir: the run directory.
        storage: its storage (the manager's, created once from its ``storage_options``):
            saves, sidecars, the lock and every prune pass use it.
        process_group: the training process group (``None``: the default group, if any).
        policies: retention policies (none: pruning is off).
        best: how the best checkpoint, which no prune deletes, is told.
        eval_result_filename: the results file whose metrics feed ``best`` and best-N policies.
        async_snapshot: how async saves freeze the state (see :mod:`reckpt.save.async_saver`).
    """

    def __init__(
        self,
        model_dir: str,
        storage: Storage,
        process_group: Any,
        policies: Sequence[RetentionPolicy],
        best: BestRule,
        eval_result_filename: str,
        async_snapshot: str,
    ) -> None:
        self.model_dir = model_dir
        self.storage = storage
        self.pg = process_group
        self.policies = list(policies)
        self.best = best
        self.eval_result_filename = eval_result_filename
        self.saver = AsyncSaver(async_snapshot)  # also holds a host copy reused between saves
        self._delta_staged: dict[str, dict[str, Any]] = {}  # the host copy of deltas' dense parts
        self.pruner: Pruner | None = None
        self.sidecar_lock = threading.Lock()  # metrics sidecar: written by saves and evals
        self._lock: contextlib.ExitStack | None = None
        self._leases: dict[str, contextlib.ExitStack] = {}
        self._saves: deque[SaveRecord] = deque(maxlen=SAVE_RECORDS_KEPT)  # appended by save threads

    def take_lock(self) -> None:
        """Rank 0, at the first save: the model_dir's writer lock (released by :meth:`close`)."""
        if self._lock is None and Dist(self.pg).is_coordinator:
            lock = contextlib.ExitStack()
            lock.enter_context(model_dir_lock(self.storage, self.model_dir))
            self._lock = lock

    def async_write(self, step: int, start: float) -> CheckpointWrite:
        """The ``write`` of :func:`reckpt.save.engine.save_checkpoint` for an async save of ``step``.

        It freezes the assembled parts (local to the rank), then writes and commits them in
        the background (:func:`reckpt.save.pipeline.write_checkpoint`, on the gloo group of
        background saves, never the training group). Call after the previous save finished.
        Its first call is collective: it creates that gloo group. ``start``: when the save began.
        A delta is frozen the same way: its touched rows were already copied when it was
        assembled, and its dense part has a host copy of its own.
        """

        def write(
            storage: Storage,
            target: str,
            contents: SaveContents,
            *,
            overwrite: bool,
            process_group: Any,
            thread_count: int | None,
        ) -> None:
            del process_group  # the training group: background saves use their own
            d = Dist(self.pg)
            group = self.saver.group(d.active)
            if contents.delta is not None and self.saver.snapshot_mode == "copy":
                # A delta's dense remainder keeps host buffers of its own: staged into the full
                # saves' buffers, it would drop the tables' and the next full save would
                # allocate them again.
                staged = [
                    (name, stage_state_dict(sd, self._delta_staged.get(name))) for name, sd in contents.parts
                ]
                self._delta_staged, snapshot = dict(staged), None
            else:
                staged, snapshot = self.saver.freeze(contents.parts, d.is_coordinator, storage)
            frozen = dataclasses.replace(contents, parts=staged)
            stall = time.time() - start

            def job() -> None:  # references this object only, never the manager
                write_checkpoint(
                    storage,
                    target,
                    frozen,
                    overwrite=overwrite,
                    process_group=group,
                    thread_count=thread_count,
                    snapshot=snapshot,
                )
                self.committed(target, stall, time.time() - start, True)

            self.saver.submit(step, job)
            logger.info("async save of %s staged; caller blocked %.3fs", target, stall)

        return write

    def committed(
        self,
        path: str,
        stall: float,
        total: float,
        is_async: bool,
        tier: str = "disk",
        storage: Storage | None = None,
    ) -> None:
        """Rank 0, after a save committed ``path``: record its timings, queue a prune pass.

        ``tier``/``storage``: a save into a checkpoint tier (``reckpt.tiers``) names its tier
        and the tier's storage; its timings go to the record only (a tier's checkpoints are
        copied and pruned by the tiers, so no sidecar is added to them).
        """
        if not Dist(self.pg).is_coordinator:
            return
        if storage is None:
            with self.sidecar_lock:
                timings = {"stall_s": stall, "total_s": total, "async": is_async}
                write_checkpoint_metrics(self.storage, path, "save", timings)
        nbytes = self._bytes(path, storage or self.storage)
        record = SaveRecord(path, parse_any_step(path), nbytes, stall, total, is_async, tier)
        self._saves.append(record)
        logger.info(
            "saved %s: %d bytes, caller blocked %.3fs, total %.3fs, %.3f GB/s (async=%s, tier %s)",
            path,
            record.bytes,
            stall,
            total,
            record.gbps,
            is_async,
            tier,
        )
        self.prune()

    def _bytes(self, path: str, storage: Storage) -> int:
        """The bytes a committed checkpoint's manifest records (0 when it cannot be read)."""
        try:
            manifest = read_manifest(storage, path, check=False)
        except Exception as e:  # a statistic: a failure to read it must not fail the save
            logger.warning("%s: cannot read its manifest for the save's size: %s", path, e)
            return 0
        return 0 if manifest is None else sum(f.size for f in manifest.files.values())

    def take_saves(self) -> list[SaveRecord]:
        """Rank 0: the saves committed since the last call, oldest first (other ranks: none).

        An async save appears once its background write committed; call this again later
        (after :meth:`close`, every save of the run has appeared).
        """
        out = []
        while self._saves:
            out.append(self._saves.popleft())
        return out

    def record_eval(self, step: int, metrics: Mapping[str, float], checkpoint_dir: str) -> None:
        """Rank 0: append an eval line; the metrics also go into ``checkpoint_dir``'s sidecar."""
        if not Dist(self.pg).is_coordinator:
            return
        storage = self.storage
        append_eval_result(storage, Storage.join(self.model_dir, self.eval_result_filename), step, metrics)
        if self.saver.in_flight_step == step:
            self.saver.wait()
        # Only a reckpt-committed checkpoint gets a sidecar (the one commit predicate: one being
        # deleted is not committed, and a legacy one has no manifest the sidecar belongs to).
        if checkpoint_state(storage, checkpoint_dir) == "committed":
            with self.sidecar_lock:
                write_checkpoint_metrics(storage, checkpoint_dir, "eval", dict(metrics))

    def prune(self) -> None:
        """Rank 0: queue a prune pass on the worker (no-op without policies).

        Without a process group, a process whose ``RANK`` environment variable is not 0 is
        not rank 0 either (TorchEasyRec's rule): it never prunes.
        """
        d = Dist(self.pg)
        if not self.policies or not d.is_coordinator:
            return
        if not d.active and int(os.environ.get("RANK") or 0) != 0:
            return
        if self.pruner is None:
            self.pruner = Pruner(
                self.model_dir,
                self.storage,
                self.policies,
                self._in_flight,
                self.eval_result_filename,
                self.best,
            )
        self.pruner.request()

    def _in_flight(self) -> set[int]:
        step = self.saver.in_flight_step
        return set() if step is None else {step}

    def protect(self, path: str, lease: contextlib.AbstractContextManager[Any]) -> None:
        """Hold ``lease`` for ``path`` until :meth:`unprotect` (once per path)."""
        if path not in self._leases:
            stack = contextlib.ExitStack()
            stack.enter_context(lease)
            self._leases[path] = stack

    def unprotect(self, path: str) -> None:
        stack = self._leases.pop(path, None)
        if stack is not None:
            stack.close()

    def close(self) -> None:
        """Wait for the save in flight, drain pruning, release leases and the lock (idempotent).

        Raises the background save's failure, if any, after everything is drained.
        """
        try:
            self.saver.wait()
        finally:
            if self.pruner is not None:
                self.pruner.close()
            for path in list(self._leases):
                self.unprotect(path)
            if self._lock is not None:
                self._lock.close()
                self._lock = None
            self.saver.release()
            self._delta_staged = {}

    def drain_at_exit(self) -> None:
        """The finalizer of a manager never closed: :meth:`close`, with a warning; never raises."""
        busy = []
        if self.saver.in_flight_step is not None:
            busy.append(f"its async save of step {self.saver.in_flight_step}")
        if self.pruner is not None and self.pruner.running:
            busy.append("its pruning (any queued pass)")
        if busy:
            logger.warning(
                "CheckpointManager(%r) was not closed: finishing %s now. Call close() (or use the"
                " manager in a with block) so that this happens when you expect it.",
                self.model_dir,
                " and ".join(busy),
            )
        try:
            self.close()
        except Exception as e:
            logger.error("CheckpointManager(%r): closing it at exit failed: %s", self.model_dir, e)
