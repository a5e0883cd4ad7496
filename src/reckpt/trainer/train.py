"""``reckpt train``: periodic checkpoints, eval after save, exact resume, fine-tuning.

Built on reckpt's public API only. Restore-source precedence follows TorchEasyRec (compat
§7.1): a model_dir that already holds checkpoints needs ``--continue-train`` (which then wins
over ``--fine-tune-checkpoint``); a fine-tune restarts step numbering and reads data from
the start. A resume may use another number of processes: the rows of the current pass not
consumed yet are re-divided among them, each still read once (``docs/data.md``).

The steps run through TorchRec's train pipeline unless ``train_config.pipeline = false``
(:mod:`reckpt.trainer.pipeline`, ``docs/pipeline.md``); the loop is :mod:`reckpt.trainer.loop`,
what rank 0 prints and logs is :mod:`reckpt.trainer.log`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

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
from reckpt.trainer.log import (
    Progress,
    TrainLog,
    checkpoint_bytes,
    restore_line,
    row_log,
    summary_table,
    summary_writer,
)
from reckpt.trainer.loop import Loop
from reckpt.trainer.metrics import auc, logloss
from reckpt.trainer.model import build_model, init_distributed, shard_model, table_rows
from reckpt.trainer.pipeline import make_steps

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


def _newest_here(cfg: Config) -> str | None:
    """The newest committed checkpoint in model_dir (a delta too) or, with tiers, in any tier
    this process sees (a node's memory tier often holds a newer step than model_dir)."""
    storage = storage_for(cfg.model_dir)
    latest, step = latest_restorable_in(storage, cfg.model_dir)
    for tier in cfg.tiers() or []:
        path, at = latest_restorable_in(storage_for(tier.url, tier.storage_options), tier.url)
        if path is not None and at > step:
            latest, step = path, at
    return latest


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
            latest = _newest_here(cfg)
            if latest is not None:
                if not continue_train:
                    raise ConfigError(
                        f"model_dir {cfg.model_dir} already holds checkpoints (latest: {latest}); pass"
                        " --continue-train to resume from it, or choose another --model-dir"
                    )
                out = (latest, False)
            elif continue_train and not ft:
                there = storage_for(cfg.model_dir).isdir(cfg.model_dir)
                print(
                    f"--continue-train: no checkpoint in model_dir {cfg.model_dir}"
                    f" ({'it holds none' if there else 'it does not exist'});"
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
    row_log_dir = os.environ.get(ROW_LOG, "")
    reader = ParquetReader(files, cfg.data, rank, world, table_rows(cfg), row_ids=bool(row_log_dir))
    ckpt, fine_tune = _resolve_source(cfg, continue_train)

    constraints = None if ckpt is None else restore_constraints(ckpt, world, rank, resume=not fine_tune)
    model, optimizer = shard_model(cfg, build_model(cfg), constraints)
    tiers = cfg.tiers()
    mgr = reckpt.CheckpointManager(
        cfg.model_dir,
        keep_checkpoint_max=t.keep_checkpoint_max,
        export_config=cfg.export_config,
        save_steps=0 if t.save_checkpoints_epochs > 0 or tiers else t.save_checkpoints_steps,
        save_epochs=t.save_checkpoints_epochs,
        tiers=tiers,
        async_save=t.async_save,
        async_snapshot=t.async_snapshot,
        incremental=(
            IncrementalPolicy(t.incremental_full_every, t.incremental_max_delta_fraction)
            if t.incremental_full_every > 0
            else None
        ),
    )
    mgr.start()  # the writer lock: a second job in this model_dir stops now, not at its first save
    log = TrainLog(cfg.model_dir, enabled=rank == 0)
    position: dict[str, Any] = reader.fresh_position(0)
    source = "the data position"
    step = -1
    restore_opt = None if ignore_restore_optimizer else optimizer
    param_map = t.fine_tune_ckpt_param_map or None
    notes: list[str] = []
    began = time.time()
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
        tier = getattr(resumed, "tier", "") or "disk"  # a tiered restart names the tier it read
        notes.append(_restored(log, resumed.path, step, time.time() - began, rank, tier))
    elif ckpt is not None:
        report = reckpt.restore_model(ckpt, model, restore_opt, param_map)
        notes.append(_restored(log, ckpt, step, time.time() - began, rank, "disk"))
        if rank == 0:
            print(f"fine-tune from {ckpt}:\n{report.summary()}", file=sys.stderr)
    steps = make_steps(model, optimizer, t.pipeline)
    stack = contextlib.ExitStack()
    preemption = stack.enter_context(Preemption())
    loop = Loop(
        cfg,
        reader,
        mgr,
        model,
        optimizer,
        steps,
        lambda: evaluate(cfg, model),
        rank,
        world,
        position,
        source,
        step,
        Progress(rank, t.num_steps or None, step + 1, t.log_step_count_steps),
        log,
        writer=summary_writer(cfg.model_dir) if rank == 0 else None,
        rows_out=stack.enter_context(row_log(row_log_dir, rank)),
        kill_at=int(os.environ.get(KILL_AT_STEP, "-1")),
        eval_every=tiers[-1].every_steps if tiers else 0,
    )
    for line in notes:
        if line:
            loop.bar.note(line)
    preempted = loop.run(preemption)
    loop.bar.close()
    loop.final_save(preempted, preemption)
    mgr.close()  # waits for an async save's commit
    loop.report_saves()
    log.close()
    stack.close()
    step = loop.step
    if step + 1 == loop.first and rank == 0:
        print(
            f"nothing to train: model_dir {cfg.model_dir} is already at step {step}"
            f" (num_steps {t.num_steps}, num_epochs {t.num_epochs})",
            file=sys.stderr,
        )
    if loop.writer is not None:
        loop.writer.close()
    checkpoints = mgr.list_checkpoints()
    latest, _ = mgr.latest_checkpoint()
    if tiers:  # this rank's newest is in its fastest tier; the summary lists model_dir's
        latest = next((c.path for c in reversed(checkpoints) if c.committed), None)
    best, _ = mgr.best_checkpoint()
    if rank == 0:
        print(summary_table(checkpoints, latest, best, loop.loss_value))
    dist.barrier()
    return TrainResult(step, checkpoints, latest, best)


def _restored(log: TrainLog, path: str, step: int, seconds: float, rank: int, tier: str) -> str:
    """Rank 0: the restore's train-log record, and its line (empty on other ranks)."""
    if rank != 0:
        return ""
    nbytes, links = checkpoint_bytes(path)
    gbps = nbytes / 1e9 / max(seconds, 1e-9)
    fields = {"path": path, "bytes": nbytes, "seconds": round(seconds, 6), "gbps": round(gbps, 6)}
    log.write(step, event="restore", **fields, tier=tier)
    return restore_line(path, nbytes, seconds, tier, links)
