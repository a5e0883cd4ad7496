"""The training loop: data passes, steps, the position, saves, evals, kills and preemption.

Each step trains one batch (plainly or through TorchRec's pipeline, :mod:`reckpt.trainer.pipeline`)
and then, with the batch that step trained: logs its rows (the ``RECKPT_TRAIN_ROW_LOG`` audit),
advances the data position by that batch, reports progress, and saves when the manager says
so (an eval follows each save). A pass ends on every rank at the same step (the passes are
padded with stand-in steps); at its end the position starts the next pass.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch

import reckpt
from reckpt.lifecycle.preemption import Preemption
from reckpt.trainer.config import Config
from reckpt.trainer.data import EPOCHS_KEY, ParquetReader
from reckpt.trainer.log import Progress, TrainLog, eval_fields, save_line
from reckpt.trainer.pipeline import Steps

__all__ = ["Loop"]


@dataclass
class Loop:
    """One run's training state and the loop over it (collective: every rank runs it in step).

    ``evaluate`` is called (collectively) after each save with the model paused out of the
    pipeline. ``position``, ``step`` and ``epoch`` are where the run starts (a resume's).
    """

    cfg: Config
    reader: ParquetReader
    mgr: reckpt.CheckpointManager
    model: torch.nn.Module
    optimizer: Any
    steps: Steps
    evaluate: Callable[[], dict[str, float]]
    rank: int
    world: int
    position: dict[str, Any]
    source: str
    step: int
    bar: Progress
    log: TrainLog
    writer: Any = None
    rows_out: TextIO | None = None
    kill_at: int = -1
    eval_every: int = 0
    """With checkpoint tiers: evaluate after the saves at multiples of this (the model_dir
    tier's), and after the last one; 0: after every save."""
    epoch: int = field(init=False)
    loss_value: float = field(init=False, default=float("nan"))
    first: int = field(init=False)
    started: float = field(init=False, default_factory=time.time)

    def __post_init__(self) -> None:
        self.epoch = int(self.position.get(EPOCHS_KEY, 0))
        self.first = self.step + 1

    def run(self, preemption: Preemption) -> bool:
        """Train until ``num_steps`` or ``num_epochs`` (or a preemption: returns True)."""
        t = self.cfg.train_config
        preempted = False
        while not preempted and (
            (t.num_steps and self.step + 1 < t.num_steps) or (t.num_epochs and self.epoch < t.num_epochs)
        ):
            layout = self.reader.plan(self.position, self.source)
            if layout.redivided and self.rank == 0:
                print(
                    f"{self.source}: {layout.describe(self.cfg.data.batch_size)}", file=sys.stderr, flush=True
                )
            self.position = dict(layout.position)
            for batch, loss in self.steps.run(self.reader.batches(layout)):
                self.step += 1
                step = self.step
                if not batch.padding:  # a stand-in step learns nothing and is not logged
                    self.loss_value = float(loss)
                    if self.rows_out is not None and batch.row_ids is not None:
                        ids = " ".join(map(str, batch.row_ids.tolist()))
                        self.rows_out.write(f"{step} {self.epoch} {ids}\n")
                reckpt.update_dataloder_state(self.position, batch.position)
                self._progress(step)
                if self.mgr.maybe_save(step, self.model, self.optimizer, dataloader_state=self.position):
                    if self.eval_every <= 0 or step % self.eval_every == 0:
                        self.after_save(step)
                    else:
                        self.report_saves()
                if step == self.kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                if preemption.requested():
                    preempted = True
                    break
                if t.num_steps and step + 1 >= t.num_steps:
                    break
            else:  # the data pass ended (on every rank at the same step: the passes are padded)
                self.epoch += 1
                self.position = self.reader.fresh_position(self.epoch)
                if t.num_epochs and self.mgr.maybe_save(
                    self.step,
                    self.model,
                    self.optimizer,
                    dataloader_state=self.position,
                    epoch=self.epoch - 1,
                ):
                    self.after_save(self.step)
        return preempted

    def _progress(self, step: int) -> None:
        every = max(self.cfg.train_config.log_step_count_steps, 1)
        done = step + 1 - self.first  # steps trained by this run (a resumed run starts later)
        eps = done * self.cfg.data.batch_size * self.world / max(time.time() - self.started, 1e-9)
        if step % every == 0:
            if self.writer is not None:
                self.writer.add_scalar("loss", self.loss_value, step)
            self.log.write(step, loss=self.loss_value, examples_per_s=round(eps, 1))
        self.bar.update(step, self.loss_value, eps)
        self.report_saves()

    def after_save(self, step: int) -> None:
        """Collective: report the save (when committed), then evaluate and record the metrics."""
        self.report_saves()
        with self.steps.paused():
            metrics = self.evaluate()
        self.mgr.record_eval(step, metrics)
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"metric/{k}", v, step)
        self.log.write(step, event="eval", **eval_fields(metrics))
        if self.rank == 0:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            self.bar.note(f"step {step}: saved {self.mgr.checkpoint_dir(step)}; eval {shown}")

    def report_saves(self) -> None:
        """Rank 0: one line and one log record per save committed since the last call."""
        records = self.mgr.take_saves()
        for r in records:
            self.bar.note(save_line(r))
            kind = "delta" if ".delta-" in r.path.rsplit("/", 1)[-1] else "full"
            fields = {"path": r.path, "kind": kind, "bytes": r.bytes, "stall_s": round(r.stall_s, 6)}
            fields.update(seconds=round(r.seconds, 6), gbps=round(r.gbps, 6), tier=r.tier)
            self.log.write(-1 if r.step is None else r.step, event="save", **fields, **{"async": r.is_async})
        if records:
            self.log.flush()

    def final_save(self, preempted: bool, preemption: Preemption) -> None:
        """Collective: the run's last save (after a preemption: without the eval, time is short)."""
        if preempted:
            if self.rank == 0:
                name = (
                    signal.Signals(preemption.signum).name
                    if preemption.signum
                    else "a signal on another rank"
                )
                print(
                    f"{name}: saving step {self.step} and stopping (resume with --continue-train)",
                    file=sys.stderr,
                )
            self.mgr.maybe_save(
                self.step, self.model, self.optimizer, dataloader_state=self.position, final=True
            )
        elif self.mgr.maybe_save(
            self.step, self.model, self.optimizer, dataloader_state=self.position, final=True
        ):
            self.after_save(self.step)
