"""``reckpt train``: periodic checkpoints, eval after save, exact resume, fine-tuning.

Built on reckpt's public API only. Restore-source precedence follows TorchEasyRec (compat
§7.1): a model_dir that already holds checkpoints needs ``--continue-train`` (which then wins
over ``--fine-tune-checkpoint``); a fine-tune restarts step numbering and reads data from
the start. A resume may use another number of processes: the rows of the current pass not
consumed yet are re-divided among them, each still read once (``docs/data.md``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TextIO

import torch
import torch.distributed as dist

import reckpt
from reckpt.errors import CheckpointNotFoundError, ConfigError
from reckpt.lifecycle.incremental import latest_restorable_in
from reckpt.lifecycle.preemption import Preemption
from reckpt.policy import IncrementalPolicy
from reckpt.sharding.plan import FORCE_LOAD_SHARDING_PLAN, plan_constraints, read_plan
from reckpt.storage.core import storage_for
from reckpt.trainer.config import Config
from reckpt.trainer.data import EPOCHS_KEY, ParquetReader, input_files
from reckpt.trainer.metrics import auc, logloss
from reckpt.trainer.model import build_model, init_distributed, shard_model, table_rows

__all__ = ["train_and_evaluate", "evaluate", "TrainResult"]

logger = logging.getLogger(__name__)

KILL_AT_STEP = "RECKPT_TRAIN_KILL_AT_STEP"  # test knob: SIGKILL after this step is trained
ROW_LOG = "RECKPT_TRAIN_ROW_LOG"
"""Audit knob: a folder where every rank appends, per trained batch, ``<step> <pass> <row ids>``
(the data's ``row_id`` column) to ``rows-rank<r>-pid<pid>.txt``."""


@dataclass(frozen=True, slots=True)
class TrainResult:
    last_step: int
    checkpoints: list[reckpt.CheckpointInfo]
    latest: str | None
    best: str | None


def _resolve_source(cfg: Config, continue_train: bool) -> tuple[str | None, bool]:
    """``(checkpoint to restore, is_fine_tune)``, decided on rank 0 and broadcast."""
    err: Exception | None = None
    out: tuple[str | None, bool] = (None, False)
    if dist.get_rank() == 0:
        try:
            ft = cfg.train_config.fine_tune_checkpoint
            if ft:
                path, _ = reckpt.latest_checkpoint(ft)
                if path is None:
                    raise ConfigError(f"fine_tune_checkpoint {ft}: no committed checkpoint there")
                out = (path, True)
            storage = storage_for(cfg.model_dir)
            latest, _ = latest_restorable_in(storage, cfg.model_dir)  # a delta checkpoint too
            if latest is not None:
                if not continue_train:
                    raise ConfigError(
                        f"model_dir {cfg.model_dir} already holds checkpoints (latest: {latest}); pass"
                        " --continue-train to resume from it, or choose another --model-dir"
                    )
                out = (latest, False)
            elif continue_train and not ft:
                print(
                    f"--continue-train: no checkpoint in model_dir {cfg.model_dir}"
                    f" ({'it holds none' if storage.isdir(cfg.model_dir) else 'it does not exist'});"
                    " training starts from scratch",
                    file=sys.stderr,
                    flush=True,
                )
        except Exception as e:
            err = e
    box: list[Any] = [(out, err)]
    dist.broadcast_object_list(box, src=0)
    (out, err) = box[0]
    if err is not None:
        raise err
    return out


def restore_constraints(ckpt: str, world: int, rank: int, *, resume: bool = True) -> dict[str, Any]:
    """Planner constraints that keep the plan of the checkpoint a run restores.

    TorchEasyRec pins data-parallel tables to their saved sharding type (every table with
    ``FORCE_LOAD_SHARDING_PLAN=1``). This trainer pins every table on a resume, and on a
    fine-tune from a checkpoint saved by another number of processes: the planner would
    otherwise move a small sharded table into data_parallel (or back) when the number of
    processes changes, and here that changes the table's optimizer (row-wise Adagrad when
    sharded, Adam when data-parallel), whose state would start over. With the types pinned,
    the planner re-derives only ranks and kernels.
    """
    from reckpt.format.manifest import read_manifest

    manifest = read_manifest(storage_for(ckpt), ckpt)
    moved = manifest is not None and manifest.world_size != world
    if moved and rank == 0 and manifest is not None:
        print(
            f"{ckpt} was saved by {manifest.world_size} process(es), this run has {world}:"
            " every embedding table keeps its saved sharding type",
            file=sys.stderr,
            flush=True,
        )
    pin_all = resume or moved or os.environ.get(FORCE_LOAD_SHARDING_PLAN, "") == "1"
    return plan_constraints(read_plan(ckpt), pin_all=pin_all)


def evaluate(cfg: Config, model: torch.nn.Module) -> dict[str, float]:
    """Collective: AUC and log-loss over the whole eval input (every rank scores its slice)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    reader = ParquetReader(
        input_files(cfg.data.eval_input_path, "data.eval_input_path"), cfg.data, rank, world, table_rows(cfg)
    )
    labels, probs = [], []
    model.eval()
    with torch.no_grad():
        for i, b in enumerate(reader.batches()):  # every rank the same number (padded)
            if cfg.eval_config.num_steps and i >= cfg.eval_config.num_steps:
                break
            if b.padding:  # the forward keeps the ranks in step; its stand-in row is not scored
                model(b.dense, b.sparse)
                continue
            probs.append(torch.sigmoid(model(b.dense, b.sparse).squeeze(-1)))
            labels.append(b.label)
    model.train()
    gathered: list[Any] = [None] * world
    none = torch.zeros(0)  # a rank with fewer eval rows than batches may have only stand-ins
    dist.all_gather_object(gathered, (torch.cat([none, *labels]), torch.cat([none, *probs])))
    y = torch.cat([g[0] for g in gathered])
    p = torch.cat([g[1] for g in gathered])
    return {"auc": auc(y, p), "logloss": logloss(y, p)}


def train_and_evaluate(
    cfg: Config, *, continue_train: bool = False, ignore_restore_optimizer: bool = False
) -> TrainResult:
    """Collective: train per ``cfg`` with checkpoints, eval after each save, and a final save."""
    rank, world = init_distributed()
    t = cfg.train_config
    torch.manual_seed(t.seed)
    files = input_files(cfg.data.train_input_path, "data.train_input_path")
    input_files(cfg.data.eval_input_path, "data.eval_input_path")
    row_log = os.environ.get(ROW_LOG, "")
    reader = ParquetReader(files, cfg.data, rank, world, table_rows(cfg), row_ids=bool(row_log))
    ckpt, fine_tune = _resolve_source(cfg, continue_train)

    constraints = None if ckpt is None else restore_constraints(ckpt, world, rank, resume=not fine_tune)
    model, optimizer = shard_model(cfg, build_model(cfg), constraints)
    mgr = reckpt.CheckpointManager(
        cfg.model_dir,
        keep_checkpoint_max=t.keep_checkpoint_max,
        export_config=cfg.export_config,
        save_steps=0 if t.save_checkpoints_epochs > 0 else t.save_checkpoints_steps,
        save_epochs=t.save_checkpoints_epochs,
        async_save=t.async_save,
        async_snapshot=t.async_snapshot,
        incremental=(
            IncrementalPolicy(t.incremental_full_every, t.incremental_max_delta_fraction)
            if t.incremental_full_every > 0
            else None
        ),
    )
    mgr.start()  # the writer lock: a second job in this model_dir stops now, not at its first save
    position: dict[str, Any] = reader.fresh_position(0)
    source = "the data position"
    step = -1
    restore_opt = None if ignore_restore_optimizer else optimizer
    param_map = t.fine_tune_ckpt_param_map or None
    if ckpt is not None and not fine_tune:
        # The newest checkpoint that verifies: a damaged one is skipped (and logged).
        # A resume continues the same model: a changed shape is a mistake (another model's
        # model_dir), not a fine-tune, so nothing is loaded by overlap here.
        resumed = mgr.restore_latest(model, restore_opt, ckpt_param_map_path=param_map, strict_shapes=True)
        if resumed is None:
            raise CheckpointNotFoundError(
                f"model_dir {cfg.model_dir}: no committed checkpoint to resume from"
            )
        position, step = dict(resumed.dataloader_state or {EPOCHS_KEY: 0}), resumed.step
        position = reader.adopt(position, resumed.path)
        source = f"{resumed.path}: dataloader state"
        logger.info("resumed from %s at step %d", resumed.path, step)
    elif ckpt is not None:
        report = reckpt.restore_model(ckpt, model, restore_opt, param_map)
        if rank == 0:
            print(f"fine-tune from {ckpt}:\n{report.summary()}", file=sys.stderr)
    writer = _summary_writer(cfg.model_dir) if rank == 0 else None
    kill_at = int(os.environ.get(KILL_AT_STEP, "-1"))
    epoch = int(position.get(EPOCHS_KEY, 0))
    start, first = time.time(), step + 1
    bar = _progress(rank, t.num_steps or None, step + 1, t.log_step_count_steps)
    loss_value = float("nan")
    preempted = False

    def after_save(s: int) -> None:
        metrics = evaluate(cfg, model)
        mgr.record_eval(s, metrics)
        if writer is not None:
            for k, v in metrics.items():
                writer.add_scalar(f"metric/{k}", v, s)
        if rank == 0:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            bar.note(f"step {s}: saved {mgr.checkpoint_dir(s)}; eval {shown}")

    stack = contextlib.ExitStack()
    preemption = stack.enter_context(Preemption())
    rows_out = stack.enter_context(_row_log(row_log, rank))
    while not preempted and (
        (t.num_steps and step + 1 < t.num_steps) or (t.num_epochs and epoch < t.num_epochs)
    ):
        layout = reader.plan(position, source)
        if layout.redivided and rank == 0:
            print(f"{source}: {layout.describe(cfg.data.batch_size)}", file=sys.stderr, flush=True)
        position = dict(layout.position)
        for batch in reader.batches(layout):
            step += 1
            logits = model(batch.dense, batch.sparse).squeeze(-1)
            if batch.padding:  # this rank's data ended first: a stand-in step, zero gradient
                loss = logits.sum() * 0.0
            else:
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.label)
            optimizer.zero_grad()
            torch.autograd.backward(loss)
            optimizer.step()
            if not batch.padding:
                loss_value = float(loss.detach())
                if rows_out is not None and batch.row_ids is not None:
                    rows_out.write(f"{step} {epoch} {' '.join(map(str, batch.row_ids.tolist()))}\n")
            reckpt.update_dataloder_state(position, batch.position)
            if writer is not None and step % max(t.log_step_count_steps, 1) == 0:
                writer.add_scalar("loss", loss_value, step)
            done = step + 1 - first  # steps trained by this run (a resumed run starts later)
            bar.update(step, loss_value, done * cfg.data.batch_size * world / max(time.time() - start, 1e-9))
            if mgr.maybe_save(step, model, optimizer, dataloader_state=position):
                after_save(step)
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if preemption.requested():
                preempted = True
                break
            if t.num_steps and step + 1 >= t.num_steps:
                break
        else:  # the data pass ended (on every rank at the same step: the passes are padded)
            epoch += 1
            position = reader.fresh_position(epoch)
            if t.num_epochs and mgr.maybe_save(
                step, model, optimizer, dataloader_state=position, epoch=epoch - 1
            ):
                after_save(step)
    bar.close()
    if preempted:
        if rank == 0:
            name = signal.Signals(preemption.signum).name if preemption.signum else "a signal on another rank"
            print(f"{name}: saving step {step} and stopping (resume with --continue-train)", file=sys.stderr)
        mgr.maybe_save(
            step, model, optimizer, dataloader_state=position, final=True
        )  # no eval: time is short
    elif mgr.maybe_save(step, model, optimizer, dataloader_state=position, final=True):
        after_save(step)
    mgr.close()  # waits for an async save's commit
    stack.close()
    if step + 1 == first and rank == 0:
        print(
            f"nothing to train: model_dir {cfg.model_dir} is already at step {step}"
            f" (num_steps {t.num_steps}, num_epochs {t.num_epochs})",
            file=sys.stderr,
        )
    if writer is not None:
        writer.close()
    checkpoints = mgr.list_checkpoints()
    latest, _ = mgr.latest_checkpoint()
    best, _ = mgr.best_checkpoint()
    if rank == 0:
        print(summary_table(checkpoints, latest, best, loss_value))
    dist.barrier()
    return TrainResult(step, checkpoints, latest, best)


@contextlib.contextmanager
def _row_log(folder: str, rank: int) -> Iterator[TextIO | None]:
    """The :data:`ROW_LOG` file of this rank (line-buffered: a killed run keeps its lines), or None."""
    if not folder:
        yield None
        return
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"rows-rank{rank}-pid{os.getpid()}.txt"), "a", buffering=1) as f:
        yield f


def summary_table(
    checkpoints: list[reckpt.CheckpointInfo], latest: str | None, best: str | None, loss: float
) -> str:
    head = (
        f"final train loss {loss:.4f}"
        if loss == loss
        else "final train loss n/a (no step trained by this run)"
    )
    lines = [head, f"{'step':>8}  {'state':<10} {'auc':>8} {'logloss':>8}  marks"]
    for c in checkpoints:
        marks = " ".join(m for m, p in (("latest", latest), ("best", best)) if p == c.path)
        a, ll = c.metrics.get("auc", float("nan")), c.metrics.get("logloss", float("nan"))
        lines.append(f"{c.step:>8}  {c.state:<10} {a:>8.4f} {ll:>8.4f}  {marks}")
    return "\n".join(lines)


def _summary_writer(model_dir: str) -> Any:
    """TensorBoard events in model_dir (local model_dirs; a URL model_dir gets none, with a warning)."""
    if "://" in model_dir and not model_dir.startswith("file://"):
        logger.warning("model_dir %s is remote: TensorBoard summaries are not written", model_dir)
        return None
    from torch.utils.tensorboard import SummaryWriter

    local = model_dir.removeprefix("file://")
    os.makedirs(local, exist_ok=True)
    return SummaryWriter(log_dir=local)


def _duration(seconds: float) -> str:
    """``3725`` -> ``"1h02m"``, ``125`` -> ``"2m05s"``, ``7`` -> ``"7s"``."""
    m, sec = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


class _progress:
    """Rank 0's progress (step, loss, examples/s): a tqdm bar on a terminal, else a line every
    ``log_every`` steps."""

    def __init__(self, rank: int, total: int | None, initial: int, log_every: int) -> None:
        self.bar = None
        self.rank, self.log_every = rank, max(log_every, 1)
        self.total, self.initial, self.started = total, initial, time.time()
        if rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self.last = initial

    def update(self, step: int, loss: float, eps: float) -> None:
        if self.bar is not None:
            self.bar.update(step + 1 - self.last)
            self.bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{eps:,.0f}")
        elif self.rank == 0 and step % self.log_every == 0:
            eta = ""
            if self.total and self.started is not None and step + 1 > self.initial:
                rate = (step + 1 - self.initial) / max(time.time() - self.started, 1e-9)
                eta = f" eta {_duration((self.total - step - 1) / rate)}"
            print(f"step {step} loss {loss:.4f} examples/s {eps:,.0f}{eta}", file=sys.stderr, flush=True)
        self.last = step + 1

    def note(self, line: str) -> None:
        """A line of its own (a save, an eval), shown without -v."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        elif self.rank == 0:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
