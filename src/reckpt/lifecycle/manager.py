"""``CheckpointManager``: save cadence, async save, retention, leases, eval results, resume.

Orchestration only: decisions come from :mod:`reckpt.policy` (event time:
:mod:`reckpt.lifecycle.event_time`), storage from :mod:`reckpt.storage.core`, the save and restore
engines from :mod:`reckpt.save.engine` and :mod:`reckpt.restore.engine`; what runs between calls (the
async save, pruning, the writer lock) is :mod:`reckpt.lifecycle.background`'s, drained by
:meth:`CheckpointManager.close` or, failing that, when the manager is collected or the
interpreter exits. Every collective method is called by all ranks in lockstep (the save
decision is identical on every rank); rank 0 alone writes results, sidecars and deletes.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from reckpt.commit.leases import lease
from reckpt.dist import Dist
from reckpt.dynamic import dynamic_writer
from reckpt.errors import ConfigError, IntegrityError, UnsafeCheckpointError
from reckpt.format.damage import mark_damaged
from reckpt.format.dataloader_state import restore_dataloader_state, save_dataloader_state
from reckpt.format.eval_results import TRAIN_EVAL_RESULT_FILENAME
from reckpt.lifecycle.background import Background
from reckpt.lifecycle.discovery import best_checkpoint, best_rule, latest_checkpoint, list_checkpoints
from reckpt.lifecycle.event_time import EventTimeTrigger, stamp_watermark
from reckpt.lifecycle.incremental import Incremental, latest_restorable
from reckpt.lifecycle.resume import TRAIN_STATE, ResumeInfo, TrainState, manager_extras
from reckpt.naming import checkpoint_name, parse_step
from reckpt.policy import (
    CheckpointInfo,
    IncrementalPolicy,
    LatestN,
    RetentionPolicy,
    SaveDecision,
    should_save,
)
from reckpt.restore.engine import restore_model
from reckpt.save.engine import collect_parts, save_parts
from reckpt.sharding.plan import model_plan
from reckpt.storage.core import Storage, storage_for

__all__ = ["CheckpointManager", "ResumeInfo"]

logger = logging.getLogger(__name__)


class CheckpointManager:
    """Periodic, crash-safe checkpoints of one run, with retention and exact resume.

    The constructor does no I/O. TorchEasyRec's arguments keep their meaning:
    ``keep_checkpoint_max > 0`` keeps that many newest checkpoints (0 keeps all). The best
    checkpoint is never pruned while it is known: by ``export_config.best_exporter_metric``,
    else the only metric recorded, else ``auc`` (with ``exporter_type == "best"``, a best
    that cannot be told stops pruning instead). A manager never closed is closed when it is
    garbage-collected or the interpreter exits (with a warning when work was pending).

    Args:
        model_dir: the run directory (local path or URL).
        keep_checkpoint_max: newest checkpoints to keep (0: keep all); ignored with ``retention``.
        export_config: TorchEasyRec ``ExportConfig``-like (``exporter_type``,
            ``best_exporter_metric``, ``metric_larger_is_better``).
        eval_result_filename: the JSON-lines results file written by :meth:`record_eval`.
        retention: explicit retention policies (their union is kept).
        save_steps, save_epochs, save_interval_s: :meth:`maybe_save` triggers (all off by
            default; event-time triggers: :meth:`set_save_policy`).
        async_save: make :meth:`save` asynchronous by default.
        async_snapshot: how an async save freezes the state: ``"copy"`` (default) or
            ``"fork"`` (see :mod:`reckpt.save.async_saver` for the trade-off).
        storage_options: fsspec options for URLs.
        process_group: the training process group (default: the default group, if any).
        incremental: write delta checkpoints (``model.delta-<step>``: the touched embedding
            rows plus the dense part) between full ones (see :mod:`reckpt.delta.save`).

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
        if retention is not None:
            policies = list(retention)
        else:
            policies = [LatestN(keep_checkpoint_max)] if keep_checkpoint_max > 0 else []
        self._event_time = EventTimeTrigger()
        self.set_save_policy(save_steps, save_epochs, save_interval_s=save_interval_s)
        self._async = async_save
        self._bg = Background(
            self.model_dir,
            self.storage_options,
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
        self._last_ckpt_step = -1
        self._last_ckpt_dir: str | None = None
        self._last_save_time: float | None = None
        self._started = time.time()
        self._damaged: set[str] = set()  # skipped by restore_latest: a new save replaces them
        self._locked = False  # the writer lock was taken (start()); the same on every rank
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
        """TorchEasyRec's ``set_save_policy``: when :meth:`maybe_save` saves.

        Collective when an event-time trigger is on under a process group (the first such
        call creates the gloo group event times are gathered on). Leaves the event-time
        reference alone, so a watermark seeded by a restore survives.

        Args:
            save_steps: save at steps divisible by this (0: off).
            save_epochs: save at the end of every this many epochs (0: off).
            ts_interval_s: save when the data's event time crosses a multiple of this many
                seconds since the Unix epoch (0: off; see :mod:`reckpt.lifecycle.event_time`).
            ts_targets: save once when the data's event time reaches each of these Unix times.
            ts_quorum: the fraction of ranks, in (0, 1], whose data must have reached a time.
            save_interval_s: save when this many wall-clock seconds passed (reckpt's own).

        Raises:
            ValueError: a negative interval, or (a ``ConfigError``) an event-time trigger
                with ``ts_quorum`` outside (0, 1].
        """
        decision = SaveDecision(
            save_steps=save_steps, save_epochs=save_epochs, save_interval_s=save_interval_s
        )
        self._event_time.configure(ts_interval_s, ts_targets, ts_quorum, self._pg)
        self._decision = decision

    def needs_worker_timestamps(self) -> bool:
        """Whether :meth:`maybe_save` needs every rank's ``data_timestamp`` (event-time triggers on)."""
        return self._event_time.enabled

    # -- save --------------------------------------------------------------------------
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
        self._arm()
        self.start()
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
                self._bg.committed(delta, time.time() - start, time.time() - start, False)
                self._last_ckpt_step, self._last_ckpt_dir, self._last_save_time = step, delta, time.time()
                return delta
        parts = collect_parts(model, optimizer, dense_ema, extras, "name")
        path = self.checkpoint_dir(step)
        # A checkpoint of this step that this run's resume found damaged is replaced (one
        # marked damaged on storage is replaced by save_parts itself).
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
            self._bg.committed(path, time.time() - start, time.time() - start, False)
        else:
            self._bg.save_async(step, path, parts, kwargs, start)  # the previous save finished
        if self._incremental is not None:
            self._incremental.saved_full(path)
        self._last_ckpt_step, self._last_ckpt_dir, self._last_save_time = step, path, time.time()
        return path

    def _arm(self) -> None:
        if not self._finalizer.alive:  # run by hand (TorchEasyRec's tests do): re-arm for exit
            self._finalizer = weakref.finalize(self, self._bg.drain_at_exit)
            self._locked = False  # the drain released the writer lock

    def maybe_save(
        self,
        step: int,
        model: Any,
        optimizer: Any = None,
        dataloader_state: Mapping[str, Any] | None = None,
        dense_ema: Any = None,
        *,
        epoch: int | None = None,
        data_timestamp: float = -1.0,
        final: bool = False,
        **kwargs: Any,
    ) -> bool:
        """Collective: save when a trigger fires and ``step`` was not saved yet; returns whether it saved.

        Triggers: ``final``, ``save_steps``, ``save_epochs`` (when ``epoch`` is given),
        ``save_interval_s`` (rank 0's clock decides) and event time. With an event-time
        trigger on, every rank passes the event time of the data it consumed
        (``data_timestamp``, Unix seconds; ``-1.0``: none); the quorum time
        (:mod:`reckpt.lifecycle.event_time`) is stamped as ``__data_ts_watermark__`` into a copy of
        ``dataloader_state`` (the caller's dict is not changed). The first quorum time only
        sets the reference: it never saves.

        A repeated step is not saved twice; at an end of pass (``final`` or ``epoch`` given)
        the newer dataloader state goes into a sidecar of the existing checkpoint, which
        stays immutable. Extra keyword arguments go to :meth:`save`.
        """
        data_ts = self._event_time.reconcile(data_timestamp)
        state = stamp_watermark(dataloader_state, data_ts)
        want = should_save(
            self._decision,
            step=step,
            epoch=epoch,
            final=final,
            now=time.time(),
            last_save_time=self._last_save_time or self._started,
        )
        if self._decision.save_interval_s > 0:
            want = bool(Dist(self._pg).broadcast(want))  # wall clocks differ: rank 0 decides
        want = self._event_time.fires(data_ts) or want  # first: the first time seeds the reference
        if not want:
            return False
        if step == self._last_ckpt_step:
            if (final or epoch is not None) and state is not None and self._last_ckpt_dir:
                if self._saver.in_flight_step == step:
                    self._saver.wait()
                if data_ts is None:  # keep the checkpoint's watermark (the reference since it)
                    state = stamp_watermark(state, self._event_time.last)
                save_dataloader_state(
                    self._last_ckpt_dir, state, storage_options=self.storage_options, process_group=self._pg
                )
            return False
        self.save(step, model, optimizer, state, dense_ema, epoch=epoch, **kwargs)
        self._last_ckpt_step = step
        self._event_time.saved(data_ts)
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
        self._event_time.seed(dl_state)
        return ResumeInfo(path, step, train_state.epoch if has_state else 0, dl_state, report)

    def restore_dataloader_state(self, checkpoint_dir: str) -> dict[str, Any] | None:
        """The checkpoint's dataloader state (:func:`reckpt.restore_dataloader_state`).

        Also seeds the event-time reference from its ``__data_ts_watermark__`` (unset when
        it has none), so the event-time trigger resumes where the saved run was.
        """
        state = restore_dataloader_state(checkpoint_dir, self.storage_options)
        self._event_time.seed(state)
        return state

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
                if Dist(self._pg).is_coordinator:  # known-bad from now on (reckpt.format.damage)
                    mark_damaged(storage_for(self.model_dir, self.storage_options), info.path, [str(e)])
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
        # the checkpoint of this step: a full one, or the delta the last save wrote
        last = self._last_ckpt_step == step and self._last_ckpt_dir
        self._bg.record_eval(step, metrics, last or self.checkpoint_dir(step))

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

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # TorchEasyRec's private names, for code (and tests) written against its manager.
    @property
    def _last_data_ts(self) -> float | None:
        return self._event_time.last

    def _reconcile_event_time(self, data_timestamp: float) -> float | None:
        return self._event_time.reconcile(data_timestamp)

    @property
    def _prune_worker(self) -> threading.Thread | None:
        return None if self._bg.pruner is None else self._bg.pruner.worker
