"""``save_model``: write model, optimizer and extra state as one committed checkpoint."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from reckpt._version import __version__
from reckpt.commit.removal import (
    cleanup_stale,
    recorded_members,
    remove_checkpoint_dir,
    replace_checkpoint_dir,
)
from reckpt.commit.state import OwnerRecord, checkpoint_state, heartbeat, new_token
from reckpt.dcp.writer import ReckptSavePlanner, ReckptWriter, dcp_call, writer_threads
from reckpt.dist import Dist
from reckpt.errors import ConfigError, StepAlreadyExistsError
from reckpt.format.damage import is_marked_damaged
from reckpt.format.dataloader_state import encode_dataloader_state, merge_dataloader_states
from reckpt.format.integrity import FileRecord
from reckpt.format.manifest import Manifest, TensorEntry, entries_from_metadata
from reckpt.format.records import FileWriter, json_record
from reckpt.naming import (
    DATALOADER_STATE_FILE,
    DENSE_EMA_DIR,
    IN_PROGRESS_MARKER,
    MANIFEST_FILE,
    META_FILE,
    MODEL_DIR,
    OPTIMIZER_DIR,
    OWNER_FILE,
    PLAN_FILE,
    parse_any_step,
    staging_name,
    validate_extra_name,
)
from reckpt.optim import optimizer_state_dict
from reckpt.ownership import EVAL_RESULT_NAMES, MEMBER_NAMES, foreign_names
from reckpt.sharding.plan import model_plan, plan_to_json
from reckpt.storage.core import Storage, storage_for
from reckpt.storage.hooks import fault_point

if TYPE_CHECKING:
    from reckpt.save.fork_snapshot import ForkSnapshot

__all__ = ["save_model", "save_parts", "collect_parts"]

logger = logging.getLogger(__name__)



def collect_parts(
    model: torch.nn.Module,
    optimizer: Any,
    dense_ema: Any,
    extra_states: Mapping[str, Any] | None,
    optimizer_layout: str,
) -> list[tuple[str, dict[str, Any]]]:
    parts: list[tuple[str, dict[str, Any]]] = [(MODEL_DIR, model.state_dict())]
    if optimizer is not None:
        parts.append((OPTIMIZER_DIR, optimizer_state_dict(model, optimizer, optimizer_layout)))
    if dense_ema is not None:
        parts.append((DENSE_EMA_DIR, dense_ema.state_dict()))
    for name, obj in (extra_states or {}).items():
        if name == DENSE_EMA_DIR and dense_ema is not None:
            raise ConfigError("extra_states['dense_ema'] and dense_ema= were both given; pass one")
        if not callable(getattr(obj, "state_dict", None)):
            raise ConfigError(f"extra_states[{name!r}] has no state_dict() method ({type(obj).__name__})")
        parts.append((validate_extra_name(name), obj.state_dict()))
    return parts


def _check_target(storage: Storage, target: str, members: set[str]) -> None:
    """Rank 0: refuse a target that is a model_dir or whose foreign entries a save would overwrite.

    Runs before anything is written. Foreign entries (:mod:`reckpt.ownership`) are otherwise
    left alone by the save.
    """
    names = storage.ls(target)
    if not names:
        return
    held = [
        n
        for n in names
        if parse_any_step(n) is not None
        and checkpoint_state(storage, Storage.join(target, n)) in ("committed", "legacy")
    ]
    held += [n for n in names if n in EVAL_RESULT_NAMES]
    if held:
        shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise ConfigError(
            f"{target} is a model_dir (it holds {shown}), not a checkpoint folder: saving there would"
            f" replace a run's root. Save into {Storage.join(target, 'model.ckpt-<step>')} instead;"
            " nothing was written"
        )
    clash = sorted(set(foreign_names(names, recorded_members(storage, target))) & members)
    if clash:
        raise ConfigError(
            f"{target}: {clash} already exist there and were not written by reckpt; this save would"
            " replace them with its own state of that name. Move them away or rename the extra"
            " state; nothing was written"
        )


def _prepare(storage: Storage, target: str, overwrite: bool, token: str, members: set[str]) -> str:
    """Rank 0: check the target, clean debris, create the staging area; returns the work dir."""
    state = checkpoint_state(storage, target)
    # A checkpoint marked damaged (reckpt.format.damage) is replaced by a new save of its step.
    if state in ("committed", "legacy") and not overwrite and not is_marked_damaged(storage, target):
        raise StepAlreadyExistsError(
            f"{target}: a committed checkpoint already exists; pass overwrite=True to replace it,"
            " or save under another step"
        )
    if state != "absent":
        _check_target(storage, target, members)
    parent = Storage.parent(target)
    storage.makedirs(parent)
    removed = cleanup_stale(storage, parent)
    if removed:
        logger.info("removed debris of crashed saves: %s", removed)
    if storage.atomic_rename:
        work = Storage.join(parent, staging_name(token))
        storage.makedirs(work)
        return work
    if state != "absent":  # object store: the old checkpoint's own entries go, marker first
        remove_checkpoint_dir(storage, target)
    storage.makedirs(target)
    return target


def _commit(storage: Storage, target: str, work: str, manifest: Manifest, token: str) -> None:
    """Rank 0: write the manifest last and make the checkpoint visible."""
    manifest_path = Storage.join(work, MANIFEST_FILE)
    if storage.atomic_rename:
        # The owner record stays until after the rename, so that a concurrent cleanup
        # never mistakes this finished-but-not-yet-renamed staging area for debris.
        storage.write_bytes(manifest_path, manifest.to_json())
        fault_point("after_manifest")
        for sub in storage.ls(work):
            if storage.isdir(Storage.join(work, sub)):
                storage.fsync_dir(Storage.join(work, sub))
        storage.fsync_dir(work)
        if storage.exists(target):  # overwrite=True, or a folder holding other files
            replace_checkpoint_dir(storage, target, work, token)
        else:
            storage.rename(work, target)
            storage.fsync_dir(Storage.parent(target))
        # Committed: the owner record is not part of the manifest's file set, and failing to
        # remove it must not turn a committed save into an error.
        with contextlib.suppress(OSError):
            storage.rm(Storage.join(target, OWNER_FILE))
    else:
        storage.write_bytes(manifest_path, manifest.to_json())
        fault_point("after_manifest")
        storage.rm(Storage.join(work, IN_PROGRESS_MARKER))


def save_model(
    checkpoint_dir: str,
    model: torch.nn.Module,
    optimizer: Any = None,
    dense_ema: Any = None,
    *,
    extra_states: Mapping[str, Any] | None = None,
    plan: Any = None,
    dataloader_state: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    user_metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    optimizer_layout: str = "name",
    storage_options: Mapping[str, Any] | None = None,
    process_group: Any = None,
    thread_count: int | None = None,
    file_writers: Sequence[FileWriter] = (),
) -> str:
    """Save a checkpoint that becomes visible only once complete.

    Collective: every rank of ``process_group`` (or of the default group; no group at all
    means one process) calls it with its own shard of the state. Rank 0 checks the target,
    creates the staging area and writes JSON files; all ranks write their DCP shards
    (``model/``, ``optimizer/``, ``dense_ema/``, one directory per extra state); rank 0
    then writes the manifest and commits (``reckpt.commit.state``). Every rank returns only after
    the commit, and every rank raises if any rank failed.

    Args:
        checkpoint_dir: target directory, normally ``<model_dir>/model.ckpt-<step>``.
        model: the model; its ``state_dict()`` goes to ``model/``.
        optimizer: optional; saved keyed by parameter name (see ``optimizer_layout``).
        dense_ema: optional stateful saved to ``dense_ema/`` (TorchEasyRec's Dense EMA).
        extra_states: name -> object with ``state_dict()`` (LR scheduler, grad scaler ...).
        plan: a TorchRec ``ShardingPlan`` (default: the model's own ``_plan``) for ``plan``.
        dataloader_state: this rank's data position; merged across ranks (per-key max).
        meta: TorchEasyRec ``meta`` flags (``load_model``, ``load_optim`` ...) for restore.
        user_metadata: free-form JSON-serialisable data kept in the manifest.
        overwrite: replace a committed checkpoint at ``checkpoint_dir``.
        optimizer_layout: ``"name"`` (default) or ``"index"`` (TorchEasyRec's positional keys).
        storage_options: fsspec options (endpoint, credentials) for URLs.
        process_group: the process group (default: the default group, if initialised).
        thread_count: writer threads (and files) per rank and part; default: one per
            256 MiB of the rank's share of the part, at most four.
        file_writers: extra per-rank writers of non-DCP files (see :data:`FileWriter`).

    Returns:
        ``checkpoint_dir``.

    Raises:
        StepAlreadyExistsError: the target is committed (and not marked damaged) and
            ``overwrite`` is off.
        ConfigError: an argument is invalid (nothing is written).

    Example:
        >>> # save_model("run/model.ckpt-100", model, optimizer)
    """
    parts = collect_parts(model, optimizer, dense_ema, extra_states, optimizer_layout)
    plan = plan if plan is not None else model_plan(model)
    from reckpt.dynamic import dynamic_writer  # imports this module

    dynamic = dynamic_writer(model, process_group=process_group)
    if dynamic is not None:
        file_writers = [*file_writers, dynamic]
    return save_parts(
        checkpoint_dir,
        parts,
        plan=plan,
        dataloader_state=dataloader_state,
        meta=meta,
        user_metadata=user_metadata,
        overwrite=overwrite,
        storage_options=storage_options,
        process_group=process_group,
        thread_count=thread_count,
        file_writers=file_writers,
    )


def save_parts(
    checkpoint_dir: str,
    parts: list[tuple[str, dict[str, Any]]],
    *,
    plan: Any = None,
    dataloader_state: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    user_metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    process_group: Any = None,
    thread_count: int | None = None,
    file_writers: Sequence[FileWriter] = (),
    delta: Mapping[str, Any] | None = None,
    snapshot: ForkSnapshot | None = None,
) -> str:
    """Collective: save ready state dicts (``[(directory name, state_dict)]``) as one checkpoint.

    The engine behind :func:`save_model` (and the async saver, which hands it staged
    copies). Same call sequence, arguments and errors as :func:`save_model`; ``delta`` is the
    manifest's link record of an incremental checkpoint (``reckpt.delta.save``). With
    ``snapshot`` (this rank's :class:`~reckpt.save.fork_snapshot.ForkSnapshot` of ``parts``) the
    tensor data is written by the snapshot's process from its frozen image; ``parts`` then
    serve only for planning, which reads shapes, never values.
    """
    d = Dist(process_group)
    target = checkpoint_dir.rstrip("/") or checkpoint_dir
    storage = storage_for(target, storage_options)
    start = time.time()
    if user_metadata is not None:
        try:
            json.dumps(dict(user_metadata))
        except TypeError as e:
            raise ConfigError(f"user_metadata must be JSON-serialisable: {e}") from e
    plan_doc = plan_to_json(plan) if plan is not None else None

    token = d.broadcast(new_token())
    members = {name for name, _ in parts}
    work = ""
    err: BaseException | None = None
    with contextlib.ExitStack() as stack:
        if d.is_coordinator:
            try:
                work = _prepare(storage, target, overwrite, token, members)
                record = OWNER_FILE if storage.atomic_rename else IN_PROGRESS_MARKER
                owner = OwnerRecord.mine(token, target, time.time(), members | MEMBER_NAMES)
                stack.enter_context(heartbeat(storage, Storage.join(work, record), owner.render))
            except Exception as e:
                err = e
        d.raise_if_any(err, f"preparing the save of {target}")
        work = d.broadcast(work)
        fault_point("begin", d.rank)

        records: dict[str, FileRecord] = {}
        entries: dict[str, list[TensorEntry]] = {}
        try:
            for name, sd in parts:
                threads = thread_count if thread_count is not None else writer_threads(sd)
                part_dir = Storage.join(work, name)
                writer = (
                    ReckptWriter(part_dir, storage, name, threads)
                    if snapshot is None
                    else snapshot.writer(name, part_dir, storage, name, threads)
                )
                md = dcp_call(
                    dcp_save,
                    f"saving {name}/ of {target}",
                    sd,
                    storage_writer=writer,
                    planner=ReckptSavePlanner(),
                    process_group=process_group,
                    no_dist=not d.active,
                )
                records.update(writer.records)
                entries[name] = entries_from_metadata(md)
                fault_point(f"after_{name}", d.rank)
            for file_writer in file_writers:
                records.update(file_writer(storage, work))
            merged_dl = None
            if dataloader_state is not None:
                merged_dl = merge_dataloader_states(d.all_gather(dict(dataloader_state)))
            if d.is_coordinator:
                if plan_doc is not None:
                    records[PLAN_FILE] = json_record(storage, work, PLAN_FILE, plan_doc)
                if meta is not None:
                    records[META_FILE] = json_record(storage, work, META_FILE, dict(meta))
                if merged_dl is not None:
                    data = encode_dataloader_state(merged_dl)
                    records[DATALOADER_STATE_FILE] = json_record(storage, work, DATALOADER_STATE_FILE, data)
        except Exception as e:
            err = e
        gathered = d.all_gather((records, err))
        fault_point("before_commit", d.rank)
        failure = next((e for _, e in gathered if e is not None), None)
        if d.is_coordinator:
            if failure is None:
                try:
                    files: dict[str, FileRecord] = {}
                    for recs, _ in gathered:
                        files.update(recs)
                    manifest = Manifest(
                        step=parse_any_step(target),
                        world_size=d.world_size,
                        entries=entries,
                        files=files,
                        user_metadata=dict(user_metadata or {}),
                        library_version=__version__,
                        delta=None if delta is None else dict(delta),
                    )
                    stack.close()  # stop the heartbeat before the record goes away
                    _commit(storage, target, work, manifest, token)
                except Exception as e:
                    failure = e
            if failure is not None:
                stack.close()
                _abort(storage, target, work)
        d.raise_if_any(failure if d.is_coordinator else None, f"saving {target}")
    fault_point("committed", d.rank)
    logger.info("saved %s in %.2fs (world size %d)", target, time.time() - start, d.world_size)
    return checkpoint_dir


def _abort(storage: Storage, target: str, work: str) -> None:
    """Rank 0: remove what a failed save wrote; never touches a committed checkpoint."""
    with contextlib.suppress(Exception):
        if storage.atomic_rename:
            storage.rm(work, recursive=True)
        elif checkpoint_state(storage, target) == "incomplete":
            remove_checkpoint_dir(storage, target)
