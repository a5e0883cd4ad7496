"""``CheckpointManager``: save cadence, async save, retention, leases, eval results, resume.

Orchestration only: when to save is :mod:`reckpt.lifecycle.triggers`' (built on
:mod:`reckpt.policy` and :mod:`reckpt.lifecycle.event_time`); a save goes the one save path
(:func:`reckpt.save.engine.save_checkpoint`), a restore through
:mod:`reckpt.lifecycle.resume`; the run's resources (its one storage, the writer lock,
retention, leases) are :class:`reckpt.lifecycle.run.ManagedRun`'s, which the manager is, and
what runs between calls (the async save, pruning) is :mod:`reckpt.lifecycle.background`'s,
drained by :meth:`CheckpointManager.close` or, failing that, when the manager is collected
or the interpreter exits. Every collective method is called by all ranks in lockstep (the save
decision is identical on every rank); rank 0 alone writes results, sidecars and deletes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from reckpt.dist import Dist
from reckpt.errors import ConfigError
from reckpt.format.damage import mark_damaged
from reckpt.format.dataloader_state import restore_dataloader_state, write_dataloader_state
from reckpt.format.eval_results import TRAIN_EVAL_RESULT_FILENAME
from reckpt.lifecycle.discovery import latest_in
from reckpt.lifecycle.event_time import stamp_watermark
from reckpt.lifecycle.incremental import Incremental, latest_restorable_in
from reckpt.lifecycle.resume import ResumeInfo, TrainState, manager_extras, restore_newest, restore_run
from reckpt.lifecycle.run import ManagedRun
from reckpt.lifecycle.tiered import Tiered
from reckpt.lifecycle.triggers import SaveTriggers
from reckpt.policy import IncrementalPolicy, RetentionPolicy
from reckpt.save.engine import save_checkpoint
from reckpt.storage.core import Storage
from reckpt.tiers.config import Tier

__all__ = ["CheckpointManager", "ResumeInfo"]

logger = logging.getLogger(__name__)


class CheckpointManager(ManagedRun):
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
        tiers: checkpoint tiers, fastest first (:class:`reckpt.tiers.Tier`; ``docs/tiers.md``):
            each save goes to the fastest tier due at its step and a persister process copies
            it to the slower ones; :meth:`restore_latest` resumes from the fastest tier holding
            the newest step every rank can load. The tiers' cadences and ``keep`` replace
            ``save_steps`` and retention; ``model_dir`` keeps the eval results and the writer lock.

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
        tiers: Sequence[Tier] | None = None,
    ) -> None:
        if tiers is not None and (keep_checkpoint_max or retention is not None or incremental or save_steps):
            raise ConfigError(
                "tiers= sets the cadence and retention of every tier: leave keep_checkpoint_max,"
                " retention, save_steps and incremental unset"
            )
        super().__init__(
            model_dir,
            keep_checkpoint_max,
            export_config,
            eval_result_filename,
            retention,
            async_snapshot,
            storage_options,
            process_group,
        )
        self._triggers = SaveTriggers(process_group)
        self._event_time = self._triggers.event_time
        self.set_save_policy(save_steps, save_epochs, save_interval_s=save_interval_s)
        self._async = async_save
        self._last_ckpt_step = -1
        self._last_ckpt_dir: str | None = None
        self._damaged: set[str] = set()  # skipped by restore_latest: a new save replaces them
        self._incremental = (
            None
            if incremental is None
            else Incremental(incremental, self.model_dir, self._storage, process_group)
        )
        self._tiered: Tiered | None = None
        if tiers is not None:
            self._tiered = Tiered(
                tiers,
                self._saver,
                process_group,
                eval_result_filename,
                self._bg.best,
                on_commit=self._bg.committed,
            )
            self.set_save_policy(
                self._tiered.tiers.trigger_steps, save_epochs, save_interval_s=save_interval_s
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
        triggers = (ts_interval_s, ts_targets, ts_quorum)
        self._triggers.configure(save_steps, save_epochs, *triggers, save_interval_s=save_interval_s)

    def needs_worker_timestamps(self) -> bool:
        """Whether :meth:`maybe_save` needs every rank's ``data_timestamp`` (event-time triggers on)."""
        return self._event_time.enabled

    # -- save --------------------------------------------------------------------------
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
        promote: bool = False,
    ) -> str:
        """Collective: save everything needed to resume at ``step + 1``; returns the checkpoint path.

        Saves model, optimizer, Dense EMA, LR scheduler, grad scaler, extra states, the train
        state (step, epoch, every rank's RNG states) and the merged dataloader state. With
        ``async_save`` the call returns once the state is frozen (forked or copied); the
        caller may then modify weights in place. A previous async save is waited for first, and its failure
        is raised here. With tiers, ``promote`` copies the checkpoint to every slower tier (the
        final save of a run); a tier save replaces a checkpoint of the same step.
        """
        start = time.time()
        self._saver.wait()
        self._arm()
        self.start()
        extras = manager_extras(
            extra_states, lr_scheduler, grad_scaler, TrainState(step, epoch or 0, self._pg)
        )
        run_async = self._async if async_save is None else async_save
        if self._tiered is not None:
            args = (extras, dataloader_state, user_metadata, run_async, promote, start)
            path = self._tiered.save(step, model, optimizer, dense_ema, *args)
            self._saved(step, path)
            return path
        if self._incremental is not None:
            delta = self._incremental.maybe_save_delta(
                step,
                model,
                optimizer,
                dense_ema=dense_ema,
                extra_states=extras,
                dataloader_state=dataloader_state,
                user_metadata=user_metadata,
                write=self._bg.async_write(step, start) if run_async else None,  # as a full save
            )
            if delta is not None:
                if not run_async:
                    self._bg.committed(delta, time.time() - start, time.time() - start, False)
                self._saved(step, delta)
                return delta
        path = self.checkpoint_dir(step)
        save_checkpoint(
            self._storage,
            path,
            model,
            optimizer,
            dense_ema,
            extra_states=extras,
            dataloader_state=dataloader_state,
            user_metadata=user_metadata,
            # A checkpoint of this step that this run's resume found damaged is replaced (one
            # marked damaged on storage is replaced by the engine itself).
            overwrite=overwrite or path in self._damaged,
            process_group=self._pg,
            write=self._bg.async_write(step, start) if run_async else None,  # the previous save finished
        )
        if not run_async:
            self._bg.committed(path, time.time() - start, time.time() - start, False)
        if self._incremental is not None:
            self._incremental.saved_full(path)
        self._saved(step, path)
        return path

    def _saved(self, step: int, path: str) -> None:
        self._last_ckpt_step, self._last_ckpt_dir = step, path
        self._triggers.last_save_time = time.time()

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
        want, data_ts, state = self._triggers.check(step, epoch, final, data_timestamp, dataloader_state)
        if not want:
            return False
        if step == self._last_ckpt_step:
            if self._tiered is not None:  # the checkpoint stays as saved; a final one goes everywhere
                if final:
                    self._tiered.promote_existing(step)
                return False
            if (final or epoch is not None) and state is not None and self._last_ckpt_dir:
                if self._saver.in_flight_step == step:
                    self._saver.wait()
                if data_ts is None:  # keep the checkpoint's watermark (the reference since it)
                    state = stamp_watermark(state, self._event_time.last)
                write_dataloader_state(self._storage, self._last_ckpt_dir, state, process_group=self._pg)
            return False
        if final and self._tiered is not None:
            kwargs.setdefault("promote", True)
        self.save(step, model, optimizer, state, dense_ema, epoch=epoch, **kwargs)
        self._last_ckpt_step = step
        self._event_time.saved(data_ts)
        return True

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
        storage_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> ResumeInfo:
        """Collective: restore everything :meth:`save` wrote, RNG states included.

        ``storage_options`` default to the manager's. Extra keyword arguments go to
        :func:`reckpt.restore_model`.
        """
        self._saver.wait()
        train_state = TrainState(process_group=self._pg)
        info = restore_run(
            checkpoint_dir,
            model,
            optimizer,
            manager_extras(extra_states, lr_scheduler, grad_scaler, train_state),
            train_state,
            # the checkpoint may be another run's, or on another tier
            storage_options=self.storage_options if storage_options is None else storage_options,
            process_group=self._pg,
            ckpt_param_map_path=ckpt_param_map_path,
            error_on_missing_keys=False,
            dense_ema=dense_ema,
            use_dense_ema=use_dense_ema,
            **kwargs,
        )
        if Storage.parent(info.path) == self.model_dir:
            # A final save at the resumed step must not rewrite the checkpoint just restored.
            self._last_ckpt_step, self._last_ckpt_dir = info.step, info.path
        if self._incremental is not None:
            self._incremental.restored(info.path, model)
        self._event_time.seed(info.dataloader_state)
        return info

    def restore_dataloader_state(self, checkpoint_dir: str) -> dict[str, Any] | None:
        """The checkpoint's dataloader state (:func:`reckpt.restore_dataloader_state`).

        Also seeds the event-time reference from its ``__data_ts_watermark__`` (unset when
        it has none), so the event-time trigger resumes where the saved run was.
        """
        state = restore_dataloader_state(checkpoint_dir, self.storage_options)
        self._event_time.seed(state)
        return state

    def restore_latest(self, model: Any, optimizer: Any = None, **kwargs: Any) -> ResumeInfo | None:
        """Collective: resume from the newest checkpoint that verifies; ``None`` when there is none.

        A damaged checkpoint (a file fails its checksum, metadata is refused) is skipped with
        a warning naming the file and the reason (a later save of its step replaces it), and
        the next older one is tried. A file missing or of the wrong size is found before
        anything is loaded; flipped bits in a data file are found as it is read (the default
        verification), so the older checkpoint then overwrites what the damaged one loaded;
        pass ``verify="first"`` to check every file before loading any. Keyword arguments go
        to :meth:`restore`.

        With tiers, every rank lists its tiers, the ranks agree on the newest step every rank
        holds, and each restores it from its fastest copy (the result, a
        :class:`~reckpt.lifecycle.tiered.TieredResumeInfo`, names every rank's tier).

        Raises:
            IntegrityError: no checkpoint verifies (the newest one's error).
        """
        if self._tiered is not None:
            info = self._tiered.restore_latest(
                lambda path, options: self.restore(path, model, optimizer, storage_options=options, **kwargs)
            )
            if info is not None:
                self._last_ckpt_step, self._last_ckpt_dir = info.step, info.path
            return info

        def damaged(path: str, e: Exception) -> None:
            self._damaged.add(path)
            if Dist(self._pg).is_coordinator:  # known-bad from now on (reckpt.format.damage)
                mark_damaged(self._storage, path, [str(e)])

        return restore_newest(
            [c.path for c in self.list_checkpoints() if c.committed],
            lambda path: self.restore(path, model, optimizer, **kwargs),
            damaged,
        )

    def latest_checkpoint(self) -> tuple[str | None, int]:
        """The newest committed checkpoint (a delta too, in incremental mode; with tiers, this rank's)."""
        if self._tiered is not None:
            return self._tiered.latest()
        if self._incremental is not None:
            return latest_restorable_in(self._storage, self.model_dir)
        return latest_in(self._storage, self.model_dir)

    def record_eval(self, step: int, metrics: Mapping[str, float]) -> None:
        """Rank 0: append an eval result line and put the metrics into the step's sidecar."""
        # the checkpoint of this step: a full one, or the delta the last save wrote
        last = self._tiered is None and self._last_ckpt_step == step and self._last_ckpt_dir
        self._bg.record_eval(step, metrics, last or self.checkpoint_dir(step))

    def close(self) -> None:
        """See :meth:`ManagedRun.close`; with tiers, also wait until this node's promotions are done."""
        try:
            super().close()
        finally:
            if self._tiered is not None:
                self._tiered.close()

    # TorchEasyRec's private names, for code (and tests) written against its manager.
    @property
    def _last_data_ts(self) -> float | None:
        return self._event_time.last

    def _reconcile_event_time(self, data_timestamp: float) -> float | None:
        return self._event_time.reconcile(data_timestamp)
