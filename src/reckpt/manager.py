"""``CheckpointManager``: save cadence, async save, retention, leases, eval results, resume.

Orchestration only: decisions come from :mod:`reckpt.policy`, storage from
:mod:`reckpt.storage`, the save and restore engines from :mod:`reckpt.save` and
:mod:`reckpt.restore`. Every collective method is called by all ranks in lockstep (the
save decision is identical on every rank); rank 0 alone writes results, sidecars and
deletes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from reckpt.async_save import AsyncSaver
from reckpt.dataloader_state import (
    DATALOADER_STATE_SIDECAR,
    merge_dataloader_states,
    restore_dataloader_state,
)
from reckpt.discovery import best_checkpoint, latest_checkpoint, list_checkpoints
from reckpt.dist import Dist
from reckpt.dynamic import dynamic_writer
from reckpt.errors import ConfigError, IntegrityError, UnsafeCheckpointError
from reckpt.eval_results import TRAIN_EVAL_RESULT_FILENAME, append_eval_result, write_checkpoint_metrics
from reckpt.incremental import Incremental, latest_restorable
from reckpt.leases import lease
from reckpt.manifest import write_sidecar
from reckpt.naming import checkpoint_name, parse_step
from reckpt.plan import model_plan
from reckpt.policy import (
    BestN,
    CheckpointInfo,
    IncrementalPolicy,
    LatestN,
    RetentionPolicy,
    SaveDecision,
    should_save,
)
from reckpt.pruner import Pruner
from reckpt.restore import restore_model
from reckpt.resume import TRAIN_STATE, ResumeInfo, TrainState, manager_extras
from reckpt.run_lock import model_dir_lock
from reckpt.save import collect_parts, save_parts
from reckpt.storage import Storage, storage_for

__all__ = ["CheckpointManager", "ResumeInfo"]

logger = logging.getLogger(__name__)


class CheckpointManager:
    """Periodic, crash-safe checkpoints of one run, with retention and exact resume.

    The constructor does no I/O. TorchEasyRec's arguments keep their meaning:
    ``keep_checkpoint_max > 0`` keeps that many newest checkpoints (0 keeps all), plus the
    best one when ``export_config.exporter_type == "best"``.

    Args:
        model_dir: the run directory (local path or URL).
        keep_checkpoint_max: newest checkpoints to keep (0: keep all); ignored with ``retention``.
        export_config: TorchEasyRec ``ExportConfig``-like (``exporter_type``,
            ``best_exporter_metric``, ``metric_larger_is_better``).
        eval_result_filename: the JSON-lines results file written by :meth:`record_eval`.
        retention: explicit retention policies (their union is kept).
        save_steps, save_epochs, save_interval_s: :meth:`maybe_save` triggers (all off by default).
        async_save: make :meth:`save` asynchronous by default.
        async_snapshot: how an async save freezes the state: ``"copy"`` (default) or
            ``"fork"`` (see :mod:`reckpt.async_save` for the trade-off).
        storage_options: fsspec options for URLs.
        process_group: the training process group (default: the default group, if any).
        incremental: write delta checkpoints (``model.delta-<step>``: the touched embedding
            rows plus the dense part) between full ones (see :mod:`reckpt.delta`).

    Example:
        >>> # mgr = CheckpointManager("run", keep_checkpoint_max=3, save_steps=1000)
        >>> # for step, batch in enumerate(data):
        >>> #     ...; mgr.maybe_save(step, model, opt, dataloader_state=pos)
        >>> # mgr.close()
    """

    def __init__(
        self,
        model_dir: str,
        keep_checkpoint_max: int = 0,
        export_config: Any = None,
        eval_result_filename: str = TRAIN_EVAL_RESULT_FILENAME,
        *,
        retention: Sequence[RetentionPolicy] | None = None,
        save_steps: int = 0,
        save_epochs: int = 0,
        save_interval_s: float = 0.0,
        async_save: bool = False,
        async_snapshot: str = "copy",
        storage_options: Mapping[str, Any] | None = None,
        process_group: Any = None,
        incremental: IncrementalPolicy | None = None,
    ) -> None:
        if keep_checkpoint_max < 0:
            raise ConfigError(f"keep_checkpoint_max must be >= 0, got {keep_checkpoint_max}")
        self.model_dir = model_dir.rstrip("/") or model_dir
        self.export_config = export_config
        self.eval_result_filename = eval_result_filename
        self.storage_options = dict(storage_options or {})
        self._pg = process_group
        self._best_protected = getattr(export_config, "exporter_type", None) == "best"
        if retention is not None:
            self._policies = list(retention)
        else:
            self._policies = [LatestN(keep_checkpoint_max)] if keep_checkpoint_max > 0 else []
        self._best_protected |= any(isinstance(p, BestN) for p in self._policies)
        self.set_save_policy(save_steps, save_epochs, save_interval_s=save_interval_s)
        self._async = async_save
        self._saver = AsyncSaver(async_snapshot)  # also holds a host copy reused between saves
        self._lock: contextlib.ExitStack | None = None
        self._pruner: Pruner | None = None
        self._sidecar_lock = threading.Lock()
        self._protected: dict[str, contextlib.ExitStack] = {}
        self._last_ckpt_step = -1
        self._last_ckpt_dir: str | None = None
        self._last_save_time: float | None = None
        self._started = time.time()
        self._damaged: set[str] = set()  # skipped by restore_latest: a new save replaces them
        self._incremental = (
            None
            if incremental is None
            else Incremental(incremental, self.model_dir, storage_options, process_group)
        )

    # -- policy ------------------------------------------------------------------------
    def set_save_policy(
        self,
        save_steps: int = 0,
        save_epochs: int = 0,
        ts_interval_s: float = 0,
        ts_targets: Sequence[float] = (),
        ts_quorum: float = 0.5,
        *,
        save_interval_s: float = 0.0,
    ) -> None:
        """TorchEasyRec's ``set_save_policy``; event-time triggers are not supported yet."""
        if ts_interval_s or ts_targets:
            raise ConfigError(
                "event-time save triggers (ts_interval_s / ts_targets) are not supported by reckpt yet;"
                " use save_steps, save_epochs or save_interval_s"
            )
        self._decision = SaveDecision(
            save_steps=save_steps, save_epochs=save_epochs, save_interval_s=save_interval_s
        )

    # -- save --------------------------------------------------------------------------
    def _storage(self) -> Storage:
        return storage_for(self.model_dir, self.storage_options)

    def checkpoint_dir(self, step: int) -> str:
        return Storage.join(self.model_dir, checkpoint_name(step))

    def save(
        self,
        step: int,
        model: Any,
        optimizer: Any = None,
        dataloader_state: Mapping[str, Any] | None = None,
        dense_ema: Any = None,
        *,
        epoch: int | None = None,
        lr_scheduler: Any = None,
        grad_scaler: Any = None,
        extra_states: Mapping[str, Any] | None = None,
        user_metadata: Mapping[str, Any] | None = None,
        async_save: bool | None = None,
        overwrite: bool = False,
    ) -> str:
        """Collective: save everything needed to resume at ``step + 1``; returns the checkpoint path.

        Saves model, optimizer, Dense EMA, LR scheduler, grad scaler, extra states, the train
        state (step, epoch, every rank's RNG states) and the merged dataloader state. With
        ``async_save`` the call returns once the state is frozen (forked or copied); the
        caller may then modify weights in place. A previous async save is waited for first, and its failure
        is raised here.
        """
        start = time.time()
        self._saver.wait()
        self._take_lock()
        extras = manager_extras(
            extra_states, lr_scheduler, grad_scaler, TrainState(step, epoch or 0, self._pg)
        )
        if self._incremental is not None:
            delta = self._incremental.maybe_save_delta(
                step,
                model,
                optimizer,
                dense_ema=dense_ema,
                extra_states=extras,
                dataloader_state=dataloader_state,
                user_metadata=user_metadata,
            )
            if delta is not None:
                self._after_commit(delta, start, time.time() - start, False)
                self._last_ckpt_step, self._last_ckpt_dir, self._last_save_time = step, delta, time.time()
                return delta
        parts = collect_parts(model, optimizer, dense_ema, extras, "name")
        path = self.checkpoint_dir(step)
        overwrite = overwrite or path in self._damaged
        kwargs: dict[str, Any] = {
            "plan": model_plan(model),
            "dataloader_state": dataloader_state,
            "user_metadata": user_metadata,
            "overwrite": overwrite,
            "storage_options": self.storage_options,
        }
        dynamic = dynamic_writer(model)  # copies the dynamic tables now (async-safe)
        if dynamic is not None:
            kwargs["file_writers"] = [dynamic]
        if not (self._async if async_save is None else async_save):
            save_parts(path, parts, process_group=self._pg, **kwargs)
            self._after_commit(path, start, time.time() - start, False)
        else:
            group = self._saver.group(Dist(self._pg).active)
            # The previous save finished (waited for above).
            staged, snapshot = self._saver.freeze(parts, Dist(self._pg).is_coordinator, self._storage())
            del parts
            stall = time.time() - start

            def job() -> None:
                save_parts(path, staged, process_group=group, snapshot=snapshot, **kwargs)
                self._after_commit(path, start, stall, True)

            self._saver.submit(step, job)
            logger.info("async save of %s staged; caller blocked %.3fs", path, stall)
        if self._incremental is not None:
            self._incremental.saved_full(path)
        self._last_ckpt_step, self._last_ckpt_dir, self._last_save_time = step, path, time.time()
        return path

    def _take_lock(self) -> None:
        """Rank 0, at the first save: the model_dir's writer lock (released by close())."""
        if self._lock is None and Dist(self._pg).is_coordinator:
            lock = contextlib.ExitStack()
            lock.enter_context(model_dir_lock(self._storage(), self.model_dir))
            self._lock = lock

    def _after_commit(self, path: str, start: float, stall: float, is_async: bool) -> None:
        total = time.time() - start
        if Dist(self._pg).is_coordinator:
            with self._sidecar_lock:
                write_checkpoint_metrics(
                    self._storage(), path, "save", {"stall_s": stall, "total_s": total, "async": is_async}
                )
            logger.info(
                "saved %s: caller blocked %.3fs, total %.3fs (async=%s)", path, stall, total, is_async
            )
            self.prune()

    def maybe_save(
        self,
        step: int,
        model: Any,
        optimizer: Any = None,
        dataloader_state: Mapping[str, Any] | None = None,
        dense_ema: Any = None,
        *,
        epoch: int | None = None,
        final: bool = False,
        **kwargs: Any,
    ) -> bool:
        """Collective: save when a trigger fires and ``step`` was not saved yet; returns whether it saved.

        A repeated step is not saved twice; at an end of pass (``final`` or ``epoch`` given)
        the newer dataloader state goes into a sidecar of the existing checkpoint, which
        stays immutable.
        """
        d = Dist(self._pg)
        want = should_save(
            self._decision,
            step=step,
            epoch=epoch,
            final=final,
            now=time.time(),
            last_save_time=self._last_save_time or self._started,
        )
        if self._decision.save_interval_s > 0:
            want = bool(d.broadcast(want))  # wall clocks differ between ranks: rank 0 decides
        if not want:
            return False
        if step == self._last_ckpt_step:
            if (final or epoch is not None) and dataloader_state is not None and self._last_ckpt_dir:
                merged = merge_dataloader_states(d.all_gather(dict(dataloader_state)))
                if d.is_coordinator:
                    if self._saver.in_flight_step == step:
                        self._saver.wait()
                    write_sidecar(self._storage(), self._last_ckpt_dir, DATALOADER_STATE_SIDECAR, merged)
            return False
        self.save(step, model, optimizer, dataloader_state, dense_ema, epoch=epoch, **kwargs)
        return True

    def wait(self) -> None:
        """Block until the async save in flight is committed; raise its failure."""
        self._saver.wait()

    # -- restore and discovery ---------------------------------------------------------
    def restore(
        self,
        checkpoint_dir: str,
        model: Any,
        optimizer: Any = None,
        ckpt_param_map_path: str | None = None,
        dense_ema: Any = None,
        use_dense_ema: bool = False,
        *,
        lr_scheduler: Any = None,
        grad_scaler: Any = None,
        extra_states: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> ResumeInfo:
        """Collective: restore everything :meth:`save` wrote, RNG states included.

        Extra keyword arguments go to :func:`reckpt.restore_model`.
        """
        self._saver.wait()
        train_state = TrainState(process_group=self._pg)
        extras = manager_extras(extra_states, lr_scheduler, grad_scaler, train_state)
        report = restore_model(
            checkpoint_dir,
            model,
            optimizer,
            ckpt_param_map_path,
            False,
            dense_ema,
            use_dense_ema,
            extra_states=extras,
            storage_options=self.storage_options,
            process_group=self._pg,
            **kwargs,
        )
        restored = report.parts.get(TRAIN_STATE)
        has_state = restored is not None and restored.skipped is None
        step = train_state.step if has_state else (parse_step(checkpoint_dir) or 0)
        path = checkpoint_dir.rstrip("/")
        if Storage.parent(path) == self.model_dir:
            # A final save at the resumed step must not rewrite the checkpoint just restored.
            self._last_ckpt_step, self._last_ckpt_dir = step, path
        if self._incremental is not None:
            self._incremental.restored(path, model)
        dl_state = restore_dataloader_state(path, self.storage_options)
        return ResumeInfo(path, step, train_state.epoch if has_state else 0, dl_state, report)

    def restore_latest(self, model: Any, optimizer: Any = None, **kwargs: Any) -> ResumeInfo | None:
        """Collective: resume from the newest checkpoint that verifies; ``None`` when there is none.

        A damaged checkpoint (a file fails its checksum, metadata is refused) is skipped with
        a warning naming the file and the reason (a later save of its step replaces it), and
        the next older one is tried. A file missing or of the wrong size is found before
        anything is loaded; flipped bits in a data file are found as it is read (the default
        verification), so the older checkpoint then overwrites what the damaged one loaded;
        pass ``verify="first"`` to check every file before loading any. Keyword arguments go
        to :meth:`restore`.

        Raises:
            IntegrityError: no checkpoint verifies (the newest one's error).
        """
        first: Exception | None = None
        for info in reversed([c for c in self.list_checkpoints() if c.committed]):
            try:
                return self.restore(info.path, model, optimizer, **kwargs)
            except (IntegrityError, UnsafeCheckpointError) as e:
                logger.warning("resume: skipping %s, it does not verify: %s", info.path, e)
                self._damaged.add(info.path)
                first = first or e
        if first is not None:
            raise first
        return None

    def latest_checkpoint(self) -> tuple[str | None, int]:
        """The newest committed checkpoint (a delta too, in incremental mode)."""
        if self._incremental is not None:
            return latest_restorable(self.model_dir, self.storage_options)
        return latest_checkpoint(self.model_dir, self.storage_options)

    def best_checkpoint(self) -> tuple[str | None, int]:
        return best_checkpoint(
            self.model_dir,
            self.export_config,
            self.eval_result_filename,
            storage_options=self.storage_options,
        )

    def list_checkpoints(self) -> list[CheckpointInfo]:
        return list_checkpoints(
            self.model_dir, self.storage_options, eval_result_filename=self.eval_result_filename
        )

    def record_eval(self, step: int, metrics: Mapping[str, float]) -> None:
        """Rank 0: append an eval result line and put the metrics into the step's sidecar."""
        if not Dist(self._pg).is_coordinator:
            return
        storage = self._storage()
        append_eval_result(storage, Storage.join(self.model_dir, self.eval_result_filename), step, metrics)
        if self._saver.in_flight_step == step:
            self._saver.wait()
        # the checkpoint of this step: a full one, or the delta the last save wrote
        ckpt = (
            self._last_ckpt_dir
            if self._last_ckpt_step == step and self._last_ckpt_dir
            else self.checkpoint_dir(step)
        )
        if storage.exists(Storage.join(ckpt, "reckpt.json")):
            with self._sidecar_lock:
                write_checkpoint_metrics(storage, ckpt, "eval", dict(metrics))

    # -- retention ---------------------------------------------------------------------
    def _protected_steps(self) -> set[int]:
        protected = {self._saver.in_flight_step} if self._saver.in_flight_step is not None else set()
        if self._best_protected:
            _, best = self.best_checkpoint()  # raises on a bad results file: the pass is skipped
            if best >= 0:
                protected.add(best)
        return protected

    def prune(self) -> None:
        """Rank 0: queue a pruning pass on the background worker (no-op without policies)."""
        if not self._policies or not Dist(self._pg).is_coordinator:
            return
        if self._pruner is None:
            args = (self._storage(), self._policies, self._protected_steps, self.eval_result_filename)
            self._pruner = Pruner(self.model_dir, *args)
        self._pruner.request()

    def lease(self, checkpoint_dir: str, *, ttl_s: float = 600.0, holder: str = "") -> Any:
        """Context manager holding a checkpoint against pruning (see :func:`reckpt.leases.lease`)."""
        return lease(checkpoint_dir, ttl_s=ttl_s, holder=holder, storage_options=self.storage_options)

    def protect_checkpoint(self, path: str) -> None:
        """TorchEasyRec's ``protect_checkpoint``: hold a lease until :meth:`unprotect_checkpoint`."""
        key = path.rstrip("/")
        if key not in self._protected:
            stack = contextlib.ExitStack()
            stack.enter_context(self.lease(key, holder="protect_checkpoint"))
            self._protected[key] = stack

    def unprotect_checkpoint(self, path: str) -> None:
        stack = self._protected.pop(path.rstrip("/"), None)
        if stack is not None:
            stack.close()

    def close(self) -> None:
        """Wait for the async save, drain pruning, release protections (idempotent).

        Raises the background save's failure, if any, after everything is drained.
        """
        try:
            self._saver.wait()
        finally:
            if self._pruner is not None:
                self._pruner.close()
            for key in list(self._protected):
                self.unprotect_checkpoint(key)
            if self._lock is not None:
                self._lock.close()
                self._lock = None
            self._saver.release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
