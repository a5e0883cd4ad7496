"""The save path's entry points: ``save_model``, the one assembling save, and ``save_parts``.

Every checkpoint of a model is written by :func:`save_checkpoint`, whoever asks for it
(:func:`save_model`, :meth:`reckpt.CheckpointManager.save`, synchronous or not, and
:func:`reckpt.delta.save.save_delta`): it assembles the contents
(:func:`reckpt.save.contents.assemble`) and hands them to the engine
(:func:`reckpt.save.pipeline.write_checkpoint`, whose phases end in the commit protocol of
:mod:`reckpt.commit.protocol`). :func:`save_parts` feeds the engine ready state dicts (a
converted file, a fork snapshot's parts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from reckpt.format.records import FileWriter
from reckpt.save.contents import CheckpointWrite, Part, PartSplit, SaveContents, assemble, collect_parts
from reckpt.save.pipeline import write_checkpoint
from reckpt.storage.core import Storage, storage_for

if TYPE_CHECKING:
    from reckpt.save.fork_snapshot import ForkSnapshot

__all__ = ["save_model", "save_checkpoint", "save_parts", "collect_parts"]


def save_checkpoint(
    storage: Storage,
    target: str,
    model: torch.nn.Module,
    optimizer: Any = None,
    dense_ema: Any = None,
    *,
    extra_states: Mapping[str, Any] | None = None,
    plan: Any = None,
    optimizer_layout: str = "name",
    dataloader_state: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    user_metadata: Mapping[str, Any] | None = None,
    file_writers: Sequence[FileWriter] = (),
    split: PartSplit | None = None,
    dynamic_keys: str = "all",
    delta: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    process_group: Any = None,
    thread_count: int | None = None,
    write: CheckpointWrite | None = None,
) -> None:
    """Collective: the one save path of a model: assemble its checkpoint, then write it.

    Every rank calls it with its own shard of the state. The contents are assembled on
    every rank (:func:`reckpt.save.contents.assemble`, which documents the arguments it
    takes); then ``write`` (default: the engine, :func:`reckpt.save.pipeline.write_checkpoint`,
    which returns after the commit) gets them. The manager's asynchronous save passes a
    ``write`` that freezes the parts and writes them in the background.

    Args:
        storage: the target's storage, created once by the public entry point.
        target: the checkpoint directory (no trailing ``/``).
        overwrite: replace a committed checkpoint at ``target``.
        process_group: the group whose ranks save together.
        thread_count: writer threads per rank and part (default: by size).
        write: what writes the assembled contents (default: the engine, now).
    """
    contents = assemble(
        model,
        optimizer,
        dense_ema,
        extra_states=extra_states,
        plan=plan,
        optimizer_layout=optimizer_layout,
        dataloader_state=dataloader_state,
        meta=meta,
        user_metadata=user_metadata,
        file_writers=file_writers,
        split=split,
        dynamic_keys=dynamic_keys,
        delta=delta,
    )
    (write or write_checkpoint)(
        storage,
        target,
        contents,
        overwrite=overwrite,
        process_group=process_group,
        thread_count=thread_count,
    )


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
    then writes the manifest and commits (``reckpt.commit.protocol``). Every rank returns only
    after the commit, and every rank raises if any rank failed.

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
    target = checkpoint_dir.rstrip("/") or checkpoint_dir
    save_checkpoint(
        storage_for(target, storage_options),
        target,
        model,
        optimizer,
        dense_ema,
        extra_states=extra_states,
        plan=plan,
        optimizer_layout=optimizer_layout,
        dataloader_state=dataloader_state,
        meta=meta,
        user_metadata=user_metadata,
        file_writers=file_writers,
        overwrite=overwrite,
        process_group=process_group,
        thread_count=thread_count,
    )
    return checkpoint_dir


def save_parts(
    checkpoint_dir: str,
    parts: list[Part],
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

    For state that does not come from a model (a converted file, hand-built parts): no
    assembly, the engine (:func:`reckpt.save.pipeline.write_checkpoint`) writes ``parts``
    as they are. Same call sequence, arguments and errors as :func:`save_model`; ``delta``
    is the manifest's link record of an incremental checkpoint. With ``snapshot`` (this
    rank's :class:`~reckpt.save.fork_snapshot.ForkSnapshot` of ``parts``) the tensor data is
    written by the snapshot's process from its frozen image; ``parts`` then serve only for
    planning, which reads shapes, never values.
    """
    target = checkpoint_dir.rstrip("/") or checkpoint_dir
    contents = SaveContents(
        parts=parts,
        plan=plan,
        file_writers=tuple(file_writers),
        dataloader_state=dataloader_state,
        meta=meta,
        user_metadata=user_metadata,
        delta=delta,
    )
    write_checkpoint(
        storage_for(target, storage_options),
        target,
        contents,
        overwrite=overwrite,
        process_group=process_group,
        thread_count=thread_count,
        snapshot=snapshot,
    )
    return checkpoint_dir
