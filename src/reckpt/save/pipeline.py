"""The save engine: assembled contents written and committed as one checkpoint, in phases.

:func:`write_checkpoint` is collective and runs these phases, every rank in lockstep:

1. **check** (every rank): the arguments are valid; nothing is written otherwise.
2. **prepare** (rank 0, :meth:`reckpt.commit.protocol.SaveCommit.prepare`): the target is
   checked, debris is cleaned and the work directory is created; every rank learns it.
3. **write parts** (every rank): each DCP part, this rank's shards of it.
4. **write files** (every rank): the file writers; then rank 0 writes the JSON records
   (``plan``, ``meta``, the dataloader state merged over every rank).
5. **manifest** (rank 0): every rank's file records and the parts' entries, in one manifest.
6. **commit** (rank 0, :meth:`~reckpt.commit.protocol.SaveCommit.commit`), or **abort** when
   any rank failed; every rank then returns, or raises the failure.

A failure in phases 3-4 on any rank is gathered (the ranks stay in lockstep) and aborts the save.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from reckpt._version import __version__
from reckpt.commit.protocol import SaveCommit
from reckpt.commit.state import new_token
from reckpt.dcp.writer import ReckptSavePlanner, ReckptWriter, dcp_call, writer_threads
from reckpt.dist import Dist
from reckpt.errors import ConfigError
from reckpt.format.damage import is_marked_damaged
from reckpt.format.dataloader_state import encode_dataloader_state, merge_dataloader_states
from reckpt.format.integrity import FileRecord
from reckpt.format.manifest import Manifest, TensorEntry, entries_from_metadata
from reckpt.format.records import json_record
from reckpt.naming import DATALOADER_STATE_FILE, META_FILE, PLAN_FILE, parse_any_step
from reckpt.save.contents import SaveContents
from reckpt.sharding.plan import plan_to_json
from reckpt.storage.core import Storage
from reckpt.storage.hooks import fault_point

if TYPE_CHECKING:
    from reckpt.save.fork_snapshot import ForkSnapshot

__all__ = ["write_checkpoint"]

logger = logging.getLogger(__name__)

Records = dict[str, FileRecord]
Entries = dict[str, list[TensorEntry]]


def write_checkpoint(
    storage: Storage,
    target: str,
    contents: SaveContents,
    *,
    overwrite: bool = False,
    process_group: Any = None,
    thread_count: int | None = None,
    snapshot: ForkSnapshot | None = None,
) -> None:
    """Collective: write ``contents`` into ``target`` and commit it (the phases of the module doc).

    Args:
        storage: the target's storage.
        target: the checkpoint directory (no trailing ``/``).
        contents: what to write (:func:`reckpt.save.contents.assemble`).
        overwrite: replace a committed checkpoint at ``target`` (one marked damaged is
            replaced anyway).
        process_group: the group whose ranks save together (default: the default group, if any).
        thread_count: writer threads (and files) per rank and part; default: one per 256 MiB
            of the rank's share of the part, at most four.
        snapshot: this rank's fork snapshot of ``contents.parts``: its process writes the
            tensor data from its frozen image, and the parts serve only for planning.

    Raises:
        StepAlreadyExistsError: ``target`` is committed (not marked damaged), ``overwrite`` off.
        ConfigError: an argument is invalid (nothing is written).
    """
    d = Dist(process_group)
    start = time.time()
    plan_doc = _check(contents)
    token = d.broadcast(new_token())
    with SaveCommit(storage, target, token, {name for name, _ in contents.parts}) as commit:
        work = _prepare(d, commit, overwrite)
        fault_point("begin", d.rank)
        records: Records = {}
        entries: Entries = {}
        err: BaseException | None = None
        try:
            entries = _write_parts(d, storage, target, work, contents, records, thread_count, snapshot)
            _write_files(d, storage, work, contents, plan_doc, records)
        except Exception as e:
            err = e
        gathered = d.all_gather((records, err))
        fault_point("before_commit", d.rank)
        failure = next((e for _, e in gathered if e is not None), None)
        if d.is_coordinator:
            failure = _commit_or_abort(d, commit, failure, entries, [recs for recs, _ in gathered], contents)
        d.raise_if_any(failure if d.is_coordinator else None, f"saving {target}")
    fault_point("committed", d.rank)
    logger.info("saved %s in %.2fs (world size %d)", target, time.time() - start, d.world_size)


def _check(contents: SaveContents) -> dict[str, Any] | None:
    """Phase *check* (every rank): validate what is not checked elsewhere; the plan's JSON."""
    if contents.user_metadata is not None:
        try:
            json.dumps(dict(contents.user_metadata))
        except TypeError as e:
            raise ConfigError(f"user_metadata must be JSON-serialisable: {e}") from e
    return plan_to_json(contents.plan) if contents.plan is not None else None


def _prepare(d: Dist, commit: SaveCommit, overwrite: bool) -> str:
    """Phase *prepare*: rank 0 prepares the target (every rank raises its failure); the work dir."""
    storage, target = commit.storage, commit.target
    err: BaseException | None = None
    if d.is_coordinator:
        try:
            commit.prepare(lambda: overwrite or is_marked_damaged(storage, target))
        except Exception as e:
            err = e
    d.raise_if_any(err, f"preparing the save of {target}")
    return d.broadcast(commit.work)


def _write_parts(
    d: Dist,
    storage: Storage,
    target: str,
    work: str,
    contents: SaveContents,
    records: Records,
    thread_count: int | None,
    snapshot: ForkSnapshot | None,
) -> Entries:
    """Phase *write parts* (every rank): this rank's shards of every DCP part.

    Adds the files' records to ``records``; returns each part's tensor entries.
    """
    entries: Entries = {}
    for name, sd in contents.parts:
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
            process_group=d.group,
            no_dist=not d.active,
        )
        records.update(writer.records)
        entries[name] = entries_from_metadata(md)
        fault_point(f"after_{name}", d.rank)
    return entries


def _write_files(
    d: Dist,
    storage: Storage,
    work: str,
    contents: SaveContents,
    plan_doc: dict[str, Any] | None,
    records: Records,
) -> None:
    """Phase *write files*: every rank's file writers, then rank 0's JSON records.

    Collective when there is a dataloader state (every rank's is gathered and merged).
    Adds the records of what this rank wrote to ``records``.
    """
    for file_writer in contents.file_writers:
        records.update(file_writer(storage, work))
    merged_dl = None
    if contents.dataloader_state is not None:
        merged_dl = merge_dataloader_states(d.all_gather(dict(contents.dataloader_state)))
    if not d.is_coordinator:
        return
    if plan_doc is not None:
        records[PLAN_FILE] = json_record(storage, work, PLAN_FILE, plan_doc)
    if contents.meta is not None:
        records[META_FILE] = json_record(storage, work, META_FILE, dict(contents.meta))
    if merged_dl is not None:
        data = encode_dataloader_state(merged_dl)
        records[DATALOADER_STATE_FILE] = json_record(storage, work, DATALOADER_STATE_FILE, data)


def _manifest(
    d: Dist, target: str, entries: Entries, records: list[Records], contents: SaveContents
) -> Manifest:
    """Phase *manifest* (rank 0): every rank's file records and the parts' entries."""
    files: Records = {}
    for recs in records:
        files.update(recs)
    delta: Mapping[str, Any] | None = contents.delta
    return Manifest(
        step=parse_any_step(target),
        world_size=d.world_size,
        entries=entries,
        files=files,
        user_metadata=dict(contents.user_metadata or {}),
        library_version=__version__,
        delta=None if delta is None else dict(delta),
    )


def _commit_or_abort(
    d: Dist,
    commit: SaveCommit,
    failure: BaseException | None,
    entries: Entries,
    records: list[Records],
    contents: SaveContents,
) -> BaseException | None:
    """Phases *manifest* and *commit* (rank 0), or *abort* after any rank's failure; the failure."""
    if failure is None:
        try:
            commit.commit(_manifest(d, commit.target, entries, records, contents).to_json())
        except Exception as e:
            failure = e
    if failure is not None:
        commit.abort()
    return failure
