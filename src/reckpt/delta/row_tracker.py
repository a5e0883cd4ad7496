"""Which embedding rows changed since the last checkpoint: the input of a delta checkpoint.

A :class:`RowTracker` hooks the forward of embedding modules and marks, per table, the rows
the batch looks up, in a bitmap of one byte per row (1M rows: 1 MB). Under a sparse
optimizer — TorchRec's fused optimizers (SGD, row-wise Adagrad, Adagrad, lazy Adam ...)
update only the rows a batch looked up — these are exactly the rows whose weights and
optimizer state changed, which makes a delta of them lossless.

Tracked by default: every table of a TorchRec ``EmbeddingBagCollection`` /
``EmbeddingCollection`` sharded by ``DistributedModelParallel`` (fused kernels), except the
tables its plan shards ``data_parallel``: those are dense parameters replicated on every rank
and stepped by the dense optimizer (Adam in the reference trainer), which changes rows no batch
looked up, so they stay in a delta's dense part, in full. Unsharded TorchRec collections and
plain ``nn.Embedding`` / ``nn.EmbeddingBag`` are tracked only when named in ``tables``:
under a dense optimizer (Adam with weight decay, momentum SGD) untouched rows change too,
and a delta of the looked-up rows would not be lossless. Dynamic tables
(:class:`reckpt.dynamic.DynamicEmbedding`) track themselves; :meth:`RowTracker.clear` clears
them too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from reckpt.delta.row_writer import RowBuffers
from reckpt.dist import Dist
from reckpt.errors import ConfigError

__all__ = ["RowTracker", "TrackedTable"]


@dataclass(slots=True)
class TrackedTable:
    """One tracked table: its state-dict key, row count and touched-row bitmap."""

    key: str
    num_rows: int
    bitmap: torch.Tensor

    def mark(self, ids: torch.Tensor) -> None:
        ids = ids.reshape(-1).to(torch.int64)
        ids = ids[(ids >= 0) & (ids < self.num_rows)]
        self.bitmap[ids] = True


def _state_key(path: str, suffix: str, keys: set[str]) -> str:
    """The model's state-dict key of ``suffix`` under module ``path``.

    DistributedModelParallel drops its ``_dmp_wrapped_module`` segment from state-dict keys
    (DDP keeps ``module``); the first candidate the state dict holds wins.
    """
    parts = path.split(".") if path else []
    candidates = [
        [p for p in parts if p != "_dmp_wrapped_module"],
        [p for p in parts if p not in ("_dmp_wrapped_module", "module", "_orig_mod")],
        parts,
    ]
    names = [".".join([*c, suffix]) for c in candidates]
    return next((n for n in names if n in keys), names[0])


def _collection_tables(module: Any) -> list[tuple[str, str, int, list[str]]] | None:
    """``[(table name, weight key suffix, rows, feature names)]`` of a TorchRec collection, else ``None``."""
    for attr, getter, sub in (
        ("_embedding_bag_configs", "embedding_bag_configs", "embedding_bags"),
        ("_embedding_configs", "embedding_configs", "embeddings"),
    ):
        configs = getattr(module, attr, None)
        if configs is None and callable(getattr(module, getter, None)):
            configs = getattr(module, getter)()
        if configs:
            return [
                (c.name, f"{sub}.{c.name}.weight", int(c.num_embeddings), list(c.feature_names))
                for c in configs
            ]
    return None


def _data_parallel(module: Any) -> set[str]:
    """Names of the tables a sharded collection's plan replicates (``data_parallel``)."""
    plan = getattr(module, "module_sharding_plan", None)
    if not isinstance(plan, Mapping):
        return set()
    return {name for name, ps in plan.items() if getattr(ps, "sharding_type", None) == "data_parallel"}


def _is_sharded(module: Any) -> bool:
    return type(module).__name__.startswith("Sharded")


def _kjt_ids(features: Any) -> dict[str, torch.Tensor]:
    """Feature name -> ids of a ``KeyedJaggedTensor``."""
    keys = list(features.keys())
    values = features.values()
    lengths = features.length_per_key()
    return dict(zip(keys, torch.split(values, lengths), strict=True))


class RowTracker:
    """Marks the rows each embedding table looks up, until :meth:`clear`.

    Args:
        model: the model (``DistributedModelParallel`` or a plain module).
        tables: state-dict keys of tables to track (``"ebc.embedding_bags.t1.weight"``,
            ``"emb.weight"``); ``None`` tracks every sharded TorchRec collection's tables.

    Raises:
        ConfigError: a key in ``tables`` names no embedding module of the model.
    """

    def __init__(self, model: torch.nn.Module, tables: Iterable[str] | None = None) -> None:
        wanted = None if tables is None else set(tables)
        self.tables: dict[str, TrackedTable] = {}
        self.buffers = RowBuffers()  # where every delta of these tables copies their rows
        self._handles: list[Any] = []
        self._model = model
        sd_keys = set(model.state_dict().keys())
        for path, module in model.named_modules():
            if isinstance(module, torch.nn.Embedding | torch.nn.EmbeddingBag):
                key = _state_key(path, "weight", sd_keys)
                if wanted is not None and key in wanted:
                    self._hook_plain(module, self._add(key, module.num_embeddings))
                continue
            found = _collection_tables(module)
            if found is None or (wanted is None and not _is_sharded(module)):
                continue
            replicated = _data_parallel(module) if wanted is None else set()
            by_feature: dict[str, list[TrackedTable]] = {}
            for name, suffix, rows, features in found:
                key = _state_key(path, suffix, sd_keys)
                if (wanted is not None and key not in wanted) or name in replicated:
                    continue
                table = self._add(key, rows)
                for f in features:
                    by_feature.setdefault(f, []).append(table)
            if by_feature:
                self._hook_collection(module, by_feature)
        if wanted is not None and (unknown := sorted(wanted - set(self.tables))):
            raise ConfigError(
                f"RowTracker tables {unknown} name no embedding table of the model;"
                f" trackable keys look like 'ebc.embedding_bags.<table>.weight' or '<module>.weight'"
            )

    def _add(self, key: str, rows: int) -> TrackedTable:
        table = TrackedTable(key, rows, torch.zeros(rows, dtype=torch.bool))
        self.tables[key] = table
        return table

    def _hook_plain(self, module: torch.nn.Module, table: TrackedTable) -> None:
        def hook(mod: torch.nn.Module, args: tuple[Any, ...]) -> None:
            if mod.training and args:
                table.mark(args[0])

        self._handles.append(module.register_forward_pre_hook(hook))

    def _hook_collection(self, module: torch.nn.Module, by_feature: dict[str, list[TrackedTable]]) -> None:
        def hook(mod: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            features = args[0] if args else kwargs.get("features")
            if not mod.training or features is None:
                return
            for name, ids in _kjt_ids(features).items():
                for table in by_feature.get(name, ()):
                    table.mark(ids)

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def observe(self, key: str, ids: torch.Tensor) -> None:
        """Mark rows of table ``key`` by hand (for lookups the hooks do not see)."""
        if key not in self.tables:
            raise ConfigError(f"RowTracker: table {key!r} is not tracked (tracked: {sorted(self.tables)})")
        self.tables[key].mark(ids)

    def touched(self, process_group: Any = None) -> dict[str, torch.Tensor]:
        """Collective: table key -> ascending row ids touched on any rank since :meth:`clear`.

        Every rank contributes its bitmap (a max all-reduce) and gets the union.
        """
        d = Dist(process_group)
        out = {}
        for key, table in sorted(self.tables.items()):
            bitmap = table.bitmap
            if d.active and d.world_size > 1:
                bitmap = bitmap.to(torch.uint8)
                torch.distributed.all_reduce(bitmap, op=torch.distributed.ReduceOp.MAX, group=process_group)
            # numpy scans on this thread: torch.nonzero splits a large bitmap over the intra-op
            # threads, which wait for one another whenever another thread holds a core.
            ids = np.flatnonzero(bitmap.numpy()).astype(np.int64, copy=False)
            out[key] = torch.from_numpy(ids)
        return out

    def clear(self) -> None:
        """Forget the marks (after a checkpoint or a restore): the state on disk is the new baseline."""
        for table in self.tables.values():
            table.bitmap.zero_()
        for module in self._model.modules():
            clear = getattr(module, "clear_touched", None)
            if callable(clear):
                clear()

    def close(self) -> None:
        """Remove the hooks and drop the row buffers."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.buffers.release()
