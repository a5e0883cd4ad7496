"""``PartialLoadPlanner``: TorchEasyRec's partial, remapped DCP load, made strict where it matters.

For every key of the current (flattened) state dict it asks :func:`reckpt.remap.resolve_keys`
which checkpoint key fills it, then builds DCP read items against that key and points
their destination back at the current key. Keys the checkpoint lacks are skipped (and
listed in ``skipped_keys``); checkpoint keys nobody asked for are ignored.

Shapes: like TorchEasyRec's planner, a key whose shape changed loads the overlapping block
(every dimension from 0 to the smaller size; DCP plans its reads by chunk overlap, so this
holds for plain tensors, ``ShardedTensor`` and ``DTensor`` alike) and keeps its other
values. Unlike it, every such key is reported (``resolution.shape_mismatched``) and logged
once, a key whose number of dimensions changed is refused before anything is read, and
``strict_shapes=True`` refuses any shape change. Non-tensor items are unpickled with
``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem
from torch.distributed.checkpoint.planner_helpers import _create_read_items
from torch.distributed.tensor import DTensor

from reckpt.errors import ShapeMismatchError
from reckpt.format.safe_pickle import load_item_bytes
from reckpt.remap import RenameRule, Resolution, overlap_block, parse_param_map, resolve_keys
from reckpt.report import ShapeMismatch, format_shape

__all__ = ["PartialLoadPlanner", "saved_shapes", "current_shapes"]

logger = logging.getLogger(__name__)

_OUTPUT_SEGMENTS = "._output_segments_tensor"


def saved_shapes(metadata: Metadata) -> dict[str, tuple[int, ...] | None]:
    """Checkpoint key -> global shape (``None`` for non-tensor items)."""
    return {
        k: None if isinstance(md, BytesStorageMetadata) else tuple(md.size)
        for k, md in metadata.state_dict_metadata.items()
    }


def current_shapes(state_dict: Mapping[str, Any]) -> dict[str, tuple[int, ...] | None]:
    """Flattened current key -> global shape (``None`` for non-tensor values)."""
    out: dict[str, tuple[int, ...] | None] = {}
    for k, v in state_dict.items():
        size = getattr(v, "size", None)
        out[k] = tuple(size()) if isinstance(v, torch.Tensor) and callable(size) else None
    return out


class PartialLoadPlanner(DefaultLoadPlanner):
    """A DCP ``LoadPlanner`` for partial and remapped loads.

    Args:
        flatten_state_dict: flatten nested dicts (as DCP's default planner).
        flatten_sharded_tensors: flatten 2-D sharded tensors (as DCP's default planner).
        ckpt_param_map_path: a parameter-map file (``current_name checkpoint_name`` per line),
            read locally; prefer ``param_map`` for remote files.
        skip_output_segments_tensor: ignore managed-collision ``_output_segments_tensor`` keys.
        warn_on_missing_keys: log ``Skip restore state [<key>]`` for each missing key.
        param_map: explicit ``current -> checkpoint`` renames (merged over the file's).
        rename_rules: rules tried for keys the checkpoint lacks (see :mod:`reckpt.remap`).
        exclude_keys: current keys never requested (kept as they are).
        strict_shapes: refuse any shape change (default: load the overlapping block).
        allow_row_resize: with ``strict_shapes``, still load the overlapping rows of tables
            whose row count (first dimension) alone changed.
        reinit_on_mismatch: keep current values for shape mismatches that are not loaded
            instead of raising.
        source: the checkpoint directory, for messages.

    Attributes:
        skipped_keys: current keys absent from the checkpoint (TorchEasyRec's attribute).
        resolution: the full key resolution, after ``create_local_plan``.
    """

    def __init__(
        self,
        flatten_state_dict: bool = True,
        flatten_sharded_tensors: bool = True,
        ckpt_param_map_path: str | None = None,
        skip_output_segments_tensor: bool = False,
        warn_on_missing_keys: bool = True,
        *,
        param_map: Mapping[str, str] | None = None,
        rename_rules: Sequence[RenameRule] = (),
        exclude_keys: Collection[str] = (),
        strict_shapes: bool = False,
        allow_row_resize: bool = False,
        reinit_on_mismatch: bool = False,
        source: str = "",
    ) -> None:
        super().__init__(flatten_state_dict, flatten_sharded_tensors, allow_partial_load=True)
        merged: dict[str, str] = {}
        if ckpt_param_map_path is not None:
            with open(ckpt_param_map_path, encoding="utf-8") as f:
                merged.update(parse_param_map(f.read(), ckpt_param_map_path))
        merged.update(param_map or {})
        self.param_map = merged
        self.skip_output_segments_tensor = skip_output_segments_tensor
        self.warn_on_missing_keys = warn_on_missing_keys
        self.rename_rules = tuple(rename_rules)
        self.exclude_keys = frozenset(exclude_keys)
        self.strict_shapes = strict_shapes
        self.allow_row_resize = allow_row_resize
        self.reinit_on_mismatch = reinit_on_mismatch
        self.source = source
        self.skipped_keys: list[str] = []
        self.resolution = Resolution()

    def resolve(self) -> Resolution:
        """Resolve keys against ``self.metadata`` (also usable before the DCP load)."""
        if self.metadata is None:
            raise RuntimeError("PartialLoadPlanner.resolve() needs set_up_planner() first")
        current = {
            k: v
            for k, v in current_shapes(self.state_dict).items()
            if k not in self.exclude_keys
            and not (self.skip_output_segments_tensor and k.endswith(_OUTPUT_SEGMENTS))
        }
        res = resolve_keys(
            current,
            saved_shapes(self.metadata),
            param_map=self.param_map,
            rules=self.rename_rules,
            load_overlap=not self.strict_shapes,
            allow_row_resize=self.allow_row_resize,
            reinit_on_mismatch=self.reinit_on_mismatch,
        )
        if res.errors:
            raise ShapeMismatchError(self._mismatch_message(res.errors))
        return res

    def _mismatch_message(self, errors: list[ShapeMismatch]) -> str:
        lines = [
            f"  {m.key}: checkpoint {m.checkpoint_key!r} has shape {format_shape(m.saved)},"
            f" the current value {format_shape(m.current)}"
            for m in errors
        ]
        if any(overlap_block(m.saved, m.current) is None for m in errors):
            hint = (
                "A key whose number of dimensions (or tensor-ness) changed cannot be loaded:"
                " map it to another checkpoint key, or keep its initial value with a"
                " '<key> -' line in the parameter map."
            )
        else:
            hint = (
                "strict_shapes=True refuses shape changes: restore without it to load the"
                " overlapping block of each (the rest keeps its current values), or map the"
                " key elsewhere or drop it."
            )
        return (
            f"{self.source}: {len(lines)} key(s) cannot be loaded because their shapes differ:\n"
            + "\n".join(lines)
            + "\n"
            + hint
        )

    def create_local_plan(self) -> LoadPlan:
        if self.metadata is None:
            raise RuntimeError("PartialLoadPlanner.create_local_plan() needs metadata")
        res = self.resolve()
        self.resolution = res
        self.skipped_keys = list(res.missing)
        for key in res.missing:
            if self.warn_on_missing_keys:
                logger.warning("Skip restore state [%s]: not in checkpoint %s", key, self.source)
        for cur, old in res.remapped.items():
            logger.info("Remap restore state [%s] from checkpoint key [%s]", cur, old)
        for m in res.overlaps:
            logger.warning(
                "%s: shape changed, loading the overlap: %s; the rest keeps its current values",
                self.source,
                m.describe(),
            )
        requests: list[ReadItem] = []
        for fqn, ckpt_key in res.loads.items():
            obj = self.state_dict[fqn]
            if isinstance(obj, DTensor) and obj.device_mesh.get_coordinate() is None:
                continue
            items = _create_read_items(ckpt_key, self.metadata.state_dict_metadata[ckpt_key], obj)
            if ckpt_key != fqn:
                items = [
                    dataclasses.replace(i, dest_index=dataclasses.replace(i.dest_index, fqn=fqn))
                    for i in items
                ]
            requests.extend(items)
        return LoadPlan(requests)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = load_item_bytes(value, f"{self.source} [{read_item.storage_index.fqn}]")
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj
