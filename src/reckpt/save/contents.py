"""What one checkpoint holds, assembled from a model, before anything is written.

:func:`assemble` is the one place that turns "a model, its optimizer and their companions"
into :class:`SaveContents`: the DCP parts (``model/``, ``optimizer/``, ``dense_ema/``,
one per extra state), the sharding plan, the per-rank file writers (the caller's, a delta's
row files, the dynamic tables) and the records the engine writes beside them (dataloader
state, ``meta``, user metadata, a delta's link). Every save path (``save_model``, the
manager's synchronous and asynchronous saves, ``save_delta``) goes through it by way of
:func:`reckpt.save.engine.save_checkpoint`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from reckpt.dynamic.dump import dynamic_writer
from reckpt.errors import ConfigError
from reckpt.format.records import FileWriter
from reckpt.naming import DENSE_EMA_DIR, MODEL_DIR, OPTIMIZER_DIR, validate_extra_name
from reckpt.optim import optimizer_state_dict
from reckpt.sharding.plan import model_plan
from reckpt.storage.core import Storage

__all__ = ["Part", "SaveContents", "CheckpointWrite", "collect_parts", "assemble"]

Part = tuple[str, dict[str, Any]]
"""One DCP part of a checkpoint: ``(directory name, state dict)``."""

PartSplit = Callable[[list[Part]], Sequence[FileWriter]]
"""Moves state out of the collected parts (in place) into files of its own; returns their writers."""


@dataclass(frozen=True, slots=True)
class SaveContents:
    """Everything one checkpoint holds, ready for the engine (nothing written yet).

    Attributes:
        parts: the DCP parts, written in this order.
        plan: a TorchRec ``ShardingPlan`` (or its JSON form) for the ``plan`` file; ``None``: none.
        file_writers: per-rank writers of non-DCP files, called in this order after the parts.
        dataloader_state: this rank's data position; the engine merges every rank's (per-key max).
        meta: TorchEasyRec ``meta`` flags (``load_model``, ``load_optim`` ...) for restore.
        user_metadata: free-form JSON-serialisable data kept in the manifest.
        delta: the manifest's link record of an incremental checkpoint (``None``: a full one).
    """

    parts: list[Part]
    plan: Any = None
    file_writers: tuple[FileWriter, ...] = ()
    dataloader_state: Mapping[str, Any] | None = None
    meta: Mapping[str, Any] | None = None
    user_metadata: Mapping[str, Any] | None = None
    delta: Mapping[str, Any] | None = None


class CheckpointWrite(Protocol):
    """Writes and commits assembled contents: the engine (:func:`reckpt.save.pipeline.write_checkpoint`),
    or a caller's deferral of it (the manager's asynchronous save)."""

    def __call__(
        self,
        storage: Storage,
        target: str,
        contents: SaveContents,
        *,
        overwrite: bool,
        process_group: Any,
        thread_count: int | None,
    ) -> None: ...


def collect_parts(
    model: torch.nn.Module,
    optimizer: Any,
    dense_ema: Any,
    extra_states: Mapping[str, Any] | None,
    optimizer_layout: str,
) -> list[Part]:
    """The DCP parts of a checkpoint: model, optimizer (keyed by ``optimizer_layout``), Dense
    EMA, then every extra state by its name.

    Collective when an extra state's ``state_dict()`` is (the manager's train state gathers
    every rank's RNG states).

    Raises:
        ConfigError: a Dense EMA given twice, an extra state without ``state_dict()``, or a
            bad extra name.
    """
    parts: list[Part] = [(MODEL_DIR, model.state_dict())]
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


def assemble(
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
) -> SaveContents:
    """Collective (as :func:`collect_parts`): the contents of a checkpoint of ``model``.

    In this order, the same for every save: the parts are collected; ``split`` (a delta's
    row selection) moves state out of them into files of its own; the dynamic tables are
    copied (so an asynchronous save may train on while they are written later). The file
    writers run in the order: the caller's, ``split``'s, the dynamic tables'.

    Args:
        model: the model; its ``state_dict()`` is ``model/``.
        optimizer, dense_ema, extra_states, optimizer_layout: see :func:`collect_parts`.
        plan: the sharding plan; default: the model's own (``model._plan``).
        dataloader_state, meta, user_metadata, delta: see :class:`SaveContents`.
        file_writers: the caller's per-rank writers of extra files.
        split: see :data:`PartSplit`.
        dynamic_keys: which rows of the dynamic tables: ``"all"``, or ``"touched"`` (a delta).
    """
    parts = collect_parts(model, optimizer, dense_ema, extra_states, optimizer_layout)
    writers = list(file_writers)
    if split is not None:
        writers += split(parts)
    dynamic = dynamic_writer(model, keys=dynamic_keys)
    if dynamic is not None:
        writers.append(dynamic)
    return SaveContents(
        parts=parts,
        plan=plan if plan is not None else model_plan(model),
        file_writers=tuple(writers),
        dataloader_state=dataloader_state,
        meta=meta,
        user_metadata=user_metadata,
        delta=delta,
    )
