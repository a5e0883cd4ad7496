"""Managed-collision (TorchRec MCH / ZCH) state across world-size changes.

An ``MCHManagedCollisionModule`` maps raw ids to slots of its table. Sharded row-wise over W
processes, process r receives the raw ids of its share of the input buckets (TorchRec's
block bucketization: bucket ``v // ceil(input_size / buckets)``, ``buckets / W`` consecutive
buckets per process) and owns slots ``[r * zch / W, (r + 1) * zch / W)`` of the mapping and of
the embedding rows. A checkpoint holds each process's slots, sorted by raw id.

* **Positional load** works when every saved shard lies inside one current shard (same world
  size, or shrinking by a divisor): the module re-sorts its buffers after the load.
* **Redistribution** (growing, or any other change): positional loading would give a process
  entries whose slots it does not own (TorchRec then fails ``validate_state`` with the buffers
  already overwritten). Instead every admitted id is sent to the process its raw id routes to
  at the new world size and given a slot there; its embedding row (and the row's optimizer
  state) moves with it, so every admitted id looks up the same vector as before.
  Eviction counters (``_mch_*`` metadata) move with their ids.

:func:`plan_mch` decides and checks everything (raising :class:`ManagedCollisionReshardError`
naming the module) before anything is loaded; :class:`MchPlan` applies it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from reckpt.errors import CheckpointError

__all__ = ["ManagedCollisionReshardError", "MchPlan", "plan_mch", "mch_modules", "has_managed_collision"]

_EMPTY = torch.iinfo(torch.int64).max
_RAW, _MAP, _SEGMENTS, _ITER = (
    "_mch_sorted_raw_ids",
    "_mch_remapped_ids_mapping",
    "_output_segments_tensor",
    "_current_iter_tensor",
)
_WRAPPERS = ("_dmp_wrapped_module.", "module.")
_MC_COLLECTION = "._managed_collision_collection._managed_collision_modules."


class ManagedCollisionReshardError(CheckpointError, RuntimeError):
    """A managed-collision module's saved state cannot be laid out for this world size."""


def _clean(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPERS:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def mch_modules(model: torch.nn.Module) -> dict[str, Any]:
    """State-dict path -> managed-collision module (local, possibly a shard) in ``model``."""
    from torchrec.modules.mc_modules import ManagedCollisionModule

    out: dict[str, Any] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, ManagedCollisionModule):
            out.setdefault(_clean(name), mod)
    return out


def has_managed_collision(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds a TorchRec managed-collision module (without importing TorchRec)."""
    return any(any(c.__name__ == "ManagedCollisionModule" for c in type(m).__mro__) for m in model.modules())


def _nests(saved_md: Metadata, key: str, current: Any) -> bool:
    """Whether every saved shard of ``key`` lies inside one current shard (positional load works)."""
    entry = saved_md.state_dict_metadata.get(key)
    if not isinstance(entry, TensorStorageMetadata) or len(entry.size) != 1:
        return True
    cur = _current_shards(current, int(entry.size[0]))
    return all(any(a <= c and d <= b for a, b in cur) for c, d in _chunks(saved_md, key))


def _chunks(md: Metadata, key: str) -> list[tuple[int, int]]:
    entry = md.state_dict_metadata.get(key)
    if not isinstance(entry, TensorStorageMetadata):
        return []
    return sorted((c.offsets[0], c.offsets[0] + c.sizes[0]) for c in entry.chunks)


def _current_shards(value: Any, total: int) -> list[tuple[int, int]]:
    if hasattr(value, "metadata") and callable(value.metadata):
        return sorted(
            (s.shard_offsets[0], s.shard_offsets[0] + s.shard_sizes[0])
            for s in value.metadata().shards_metadata
        )
    return [(0, total)]


def _table_weight(path: str, saved: Mapping[str, Any]) -> str | None:
    """The embedding table a managed-collision module feeds (same row slots)."""
    if _MC_COLLECTION not in path:
        return None
    owner, table = path.split(_MC_COLLECTION, 1)
    for kind in ("embedding_bags", "embeddings"):
        key = f"{owner}._embedding_module.{kind}.{table}.weight"
        if key in saved:
            return key
    return None


@dataclass
class _Move:
    """One module's redistribution on this rank."""

    path: str
    weight: str
    rows: int
    buffers: dict[str, torch.Tensor]
    old_slots: torch.Tensor
    new_rows: torch.Tensor


@dataclass
class MchPlan:
    """What a restore does to managed-collision state (see :func:`plan_mch`).

    Attributes:
        moves: the modules redistributed on this rank.
        exclude: model keys not loaded positionally (rebuilt instead).
        notes: one line per redistributed module, for the load report.
        saved_rows: per redistributed table, the saved rows this rank's ids bring along.
    """

    moves: list[_Move] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    saved_rows: dict[str, torch.Tensor] = field(default_factory=dict)

    def apply_model(self, sd: Mapping[str, Any]) -> None:
        """Write the rebuilt buffers and moved embedding rows into ``sd`` (before ``load_state_dict``)."""
        for move in self.moves:
            for name, local in move.buffers.items():
                _write_rows(sd[f"{move.path}.{name}"], None, local)
            _write_rows(sd[move.weight], move.new_rows, self.saved_rows[move.weight])

    def optimizer_keys(self, saved: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        """Saved optimizer keys holding rows of a redistributed table -> their shapes."""
        out = {}
        for move in self.moves:
            for key, entry in saved.items():
                shape = tuple(getattr(entry, "size", ()))
                if key.startswith(f"state.{move.weight}.") and shape and shape[0] == move.rows:
                    out[key] = shape
        return out

    def move_optimizer_rows(
        self,
        optim_sd: Mapping[str, Any],
        saved: Mapping[str, Any],
        read: Callable[[dict[str, Any]], dict[str, torch.Tensor]],
    ) -> list[str]:
        """Collective: read the saved optimizer rows of the moved tables and move them.

        Args:
            optim_sd: the optimizer state dict being loaded (written in place).
            saved: the checkpoint's ``optimizer/`` metadata entries.
            read: collective reader of whole saved tensors.
        """
        wanted = {}
        for key, shape in self.optimizer_keys(saved).items():
            entry = saved[key]
            if isinstance(entry, TensorStorageMetadata):
                wanted[key] = (shape, entry.properties.dtype)
        full = read(wanted)
        flat = {
            f"state.{fqn}.{name}": v
            for fqn, st in (optim_sd.get("state") or {}).items()
            for name, v in st.items()
        }
        return self.apply_optimizer(flat, full)

    def apply_optimizer(self, optim_flat: Mapping[str, Any], saved: Mapping[str, torch.Tensor]) -> list[str]:
        """Move the optimizer-state rows of the redistributed tables; returns the keys moved."""
        done = []
        for move in self.moves:
            for key, value in optim_flat.items():
                if key.startswith(f"state.{move.weight}.") and key in saved:
                    _write_rows(value, move.new_rows, saved[key][move.old_slots])
                    done.append(key)
        return done


def _write_rows(value: Any, rows: torch.Tensor | None, data: torch.Tensor) -> None:
    """Write ``data`` into global rows ``rows`` of ``value`` (all of this rank's rows when ``None``)."""
    shards = (
        [(s.metadata.shard_offsets[0], s.tensor) for s in value.local_shards()]
        if hasattr(value, "local_shards")
        else [(0, value)]
    )
    for start, local in shards:
        if rows is None:
            local.copy_(data.view_as(local))
            continue
        inside = (rows >= start) & (rows < start + local.shape[0])
        if bool(inside.any()):
            local[rows[inside] - start] = data[inside].to(local.dtype)


def plan_mch(
    model: torch.nn.Module,
    model_sd: Mapping[str, Any],
    saved_md: Metadata,
    read_full: Callable[[dict[str, Any]], dict[str, torch.Tensor]],
    read_rows: Callable[[str, torch.Tensor], torch.Tensor | None],
    rank: int,
    world: int,
) -> MchPlan:
    """Collective: check every managed-collision module against the checkpoint; plan its restore.

    Args:
        model: the model to restore into.
        model_sd: its state dict (the current layout of each buffer).
        saved_md: the checkpoint's ``model/`` metadata.
        read_full: ``read_full({key: (shape, dtype)}) -> {key: tensor}``, a collective that
            reads whole saved tensors (called once, on every rank): the modules' buffers.
        read_rows: ``read_rows(key, rows) -> tensor``, this rank's reader of some rows of a
            saved table (``None``: cannot), for the rows its ids bring along.
        rank: this process's rank; ``world``: the world size.

    Raises:
        ManagedCollisionReshardError: a module cannot be laid out for this world size (the
            message names it); raised on every rank, before anything is loaded.
    """
    from torchrec.modules.mc_modules import MCHManagedCollisionModule

    saved = saved_md.state_dict_metadata
    needs: dict[str, Any] = {}
    for path, mod in sorted(mch_modules(model).items()):
        if not isinstance(mod, MCHManagedCollisionModule):
            moved = [k for k in model_sd if k.startswith(path + ".") and not _nests(saved_md, k, model_sd[k])]
            if moved:
                raise ManagedCollisionReshardError(
                    f"managed-collision module {path} ({type(mod).__name__}): its saved {moved[0]}"
                    f" is sharded for another world size, and reckpt redistributes only"
                    f" MCHManagedCollisionModule state; restore at the saved world size"
                )
            continue
        raw_key = f"{path}.{_RAW}"
        if raw_key not in saved or raw_key not in model_sd:
            continue
        entry = saved[raw_key]
        if not isinstance(entry, TensorStorageMetadata):
            continue
        total = int(entry.size[0])
        cur = _current_shards(model_sd[raw_key], total)
        if all(any(a <= c and d <= b for a, b in cur) for c, d in _chunks(saved_md, raw_key)):
            continue  # positional: each saved shard lands whole in one current shard
        needs[path] = (mod, total, cur)
    if not any(_all_gather_flags(bool(needs), world)):
        return MchPlan()

    wanted: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for path, (mod, total, cur) in needs.items():
        weight = _table_weight(path, saved)
        problem = None
        if weight is None:
            problem = "its embedding table is not in the checkpoint"
        elif len({b - a for a, b in cur}) != 1 or total % world:
            problem = f"{total} slots do not split evenly over {world} processes"
        elif mod.buckets() % world:
            problem = f"its {mod.buckets()} buckets do not split over {world} processes"
        if problem is not None or weight is None:
            raise ManagedCollisionReshardError(
                f"managed-collision module {path}: cannot redistribute the checkpoint's state to world"
                f" size {world}: {problem}. Restore at the saved world size (or one that divides it)."
            )
        for name, buf in mod.state_dict().items():
            if name.startswith("_mch_"):
                wanted[f"{path}.{name}"] = ((total,), buf.dtype)
    full = read_full(wanted)

    plan = MchPlan()
    for path, (mod, total, _cur) in needs.items():
        weight = _table_weight(path, saved) or ""
        cps = total // world
        raw, mapping = full[f"{path}.{_RAW}"], full[f"{path}.{_MAP}"]
        valid = raw != _EMPTY
        block = -(-int(mod.input_size()) // int(mod.buckets()))
        dest = torch.div(raw, block, rounding_mode="floor") // (int(mod.buckets()) // world)
        counts = torch.bincount(dest[valid].clamp(0, world - 1), minlength=world)
        if int(counts.max()) > cps:
            r = int(counts.argmax())
            raise ManagedCollisionReshardError(
                f"managed-collision module {path}: process {r} of {world} would receive"
                f" {int(counts.max())} admitted ids for {cps} slots; restore at the saved world size"
            )
        mine = valid & (dest == rank)
        order = torch.argsort(raw[mine], stable=True)
        n = int(mine.sum())
        ids = raw[mine][order]
        offset = rank * cps
        new_rows = torch.arange(offset, offset + n, dtype=torch.int64)
        buffers = {
            _RAW: torch.cat([ids, torch.full((cps - n,), _EMPTY, dtype=torch.int64)]),
            _MAP: torch.arange(offset, offset + cps, dtype=torch.int64),
        }
        for name in mod.state_dict():
            key = f"{path}.{name}"
            if name.startswith("_mch_") and name not in buffers and key in full:
                values = full[key][mine][order]
                buffers[name] = torch.cat([values, torch.zeros(cps - n, dtype=values.dtype)])
        plan.moves.append(_Move(path, weight, total, buffers, mapping[mine][order], new_rows))
        plan.exclude += [f"{path}.{name}" for name in buffers] + [f"{path}.{_SEGMENTS}"]
        plan.notes.append(
            f"managed-collision module {path}: {int(valid.sum())} admitted ids redistributed to"
            f" {world} processes by raw id, with their embedding rows"
        )
    for move in plan.moves:
        picked = read_rows(move.weight, move.old_slots)
        if picked is None:
            raise ManagedCollisionReshardError(
                f"managed-collision module {move.path}: the saved rows of {move.weight} are not"
                " stored as plain DCP records; restore at the saved world size"
            )
        plan.saved_rows[move.weight] = picked
    return plan


def _all_gather_flags(flag: bool, world: int) -> list[bool]:
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return [flag]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, flag)
    return [bool(x) for x in out]
