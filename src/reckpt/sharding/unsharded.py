"""``load_unsharded``: any checkpoint's model into a plain, single-process module, table by table.

Serving and export want the trained model in one process, with no process group and no
sharding, whatever world size and plan trained it. DCP reshards positionally into plain
tensors; this loader feeds it one large tensor (an embedding table) at a time, reading
straight into the module's own parameters, so the memory it needs above the module itself
is about one table's shards in flight (plus small tensors, batched up to ``batch_bytes``).
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata

from reckpt.dcp.items import Window, member_stream, read_full, storage_member
from reckpt.dcp.load import load_part
from reckpt.dcp.planner import PartialLoadPlanner, current_shapes, saved_shapes
from reckpt.dcp.reader import read_dcp_metadata
from reckpt.dist import Dist
from reckpt.errors import (
    CheckpointNotFoundError,
    ConfigError,
    KeyMismatchError,
    ShapeMismatchError,
    UnsafeCheckpointError,
)
from reckpt.format.manifest import read_manifest
from reckpt.format.verification import require_committed, verify_collective
from reckpt.naming import DCP_METADATA_FILE, MODEL_DIR
from reckpt.remap import Resolution, resolve_keys
from reckpt.report import LoadReport
from reckpt.storage.core import Storage, storage_for

__all__ = ["load_unsharded", "read_rows", "DEFAULT_BATCH_BYTES"]

logger = logging.getLogger(__name__)

DEFAULT_BATCH_BYTES = 16 << 20
"""Small tensors that go through DCP are read together until their bytes reach this much."""
_BLOCK_BYTES = 8 << 20


def _nbytes(value: Any) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def _batches(state: Mapping[str, Any], keys: list[str], batch_bytes: int) -> list[list[str]]:
    """Keys grouped so that each group is one large tensor or small ones up to ``batch_bytes``."""
    out: list[list[str]] = []
    small: list[str] = []
    size = 0
    for key in sorted(keys, key=lambda k: -_nbytes(state[k])):
        n = _nbytes(state[key])
        if n >= batch_bytes:
            out.append([key])
            continue
        if small and size + n > batch_bytes:
            out.append(small)
            small, size = [], 0
        small.append(key)
        size += n
    if small:
        out.append(small)
    return out


def load_unsharded(
    checkpoint_dir: str,
    module: torch.nn.Module,
    *,
    param_map: Mapping[str, str] | None = None,
    strict: bool = False,
    verify: bool = True,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    storage_options: Mapping[str, Any] | None = None,
) -> LoadReport:
    """Load a checkpoint's ``model/`` into a plain module in this process, one table at a time.

    Works for a checkpoint written by any number of processes under any plan (table-, row-,
    column-wise, data-parallel, ShardedTensor or DTensor): each tensor of ``module`` is
    filled from the overlapping saved shards. Needs no process group (and ignores one).
    Shapes are checked for every key before anything is read.

    Args:
        checkpoint_dir: a committed checkpoint.
        module: the destination, materialised (see :func:`reckpt.sharding.init_parameters` for a
            model built on the meta device); filled in place.
        param_map: ``current key -> checkpoint key`` renames.
        strict: raise if a key of ``module`` is missing from the checkpoint.
        verify: check sizes and checksums against the manifest first.
        batch_bytes: small tensors are read together up to this many bytes.
        storage_options: fsspec options for URLs.

    Returns:
        The :class:`~reckpt.report.LoadReport` (part ``"model"``).

    Raises:
        CheckpointNotFoundError: no checkpoint, or it has no ``model/``.
        ConfigError: a tensor of ``module`` is on the meta device.
        ShapeMismatchError: a key's saved shape differs (nothing has been loaded).
        KeyMismatchError: with ``strict``, keys are missing (nothing has been loaded).

    Example:
        >>> # plain = build_model(cfg)            # no DistributedModelParallel
        >>> # report = load_unsharded("run/model.ckpt-100", plain)
    """
    ckpt = checkpoint_dir.rstrip("/") or checkpoint_dir
    storage = storage_for(ckpt, storage_options)
    report, dcp_dir, md = _open_model_part(storage, ckpt, verify)
    target = module.state_dict(keep_vars=True)
    res = _resolve(target, md, dcp_dir, param_map, strict)
    rest = _stream_tensors(storage, dcp_dir, md, target, res.loads)
    _load_rest(storage, dcp_dir, md, module, target, {k: res.loads[k] for k in rest}, batch_bytes)
    _settle_managed_collision(module, dcp_dir)
    report.parts[MODEL_DIR] = res
    for key in res.missing:
        logger.warning("Skip restore state [%s]: not in checkpoint %s", key, dcp_dir)
    return report


def _open_model_part(storage: Storage, ckpt: str, verify: bool) -> tuple[LoadReport, str, Metadata]:
    """The report, ``model/`` and its metadata of a committed checkpoint, its files checked first.

    Raises:
        CheckpointNotFoundError: no checkpoint, or it has no ``model/``.
        IntegrityError: ``verify`` and a file's size or checksum differs from the manifest.
    """
    state = require_committed(storage, ckpt)
    report = LoadReport(ckpt, legacy=state == "legacy")
    manifest = read_manifest(storage, ckpt)
    if verify and manifest is not None:
        verify_collective(storage, ckpt, manifest, _NoDist())
        report.verified = True
    dcp_dir = Storage.join(ckpt, MODEL_DIR)
    if not storage.exists(Storage.join(dcp_dir, DCP_METADATA_FILE)):
        raise CheckpointNotFoundError(f"model_ckpt_path[{dcp_dir}] not exists")
    return report, dcp_dir, read_dcp_metadata(storage, dcp_dir)


def _resolve(
    target: Mapping[str, Any], md: Metadata, dcp_dir: str, param_map: Mapping[str, str] | None, strict: bool
) -> Resolution:
    """Every key of the module matched to the checkpoint, checked before anything is read.

    Raises:
        ConfigError: a tensor of the module is on the meta device.
        ShapeMismatchError: a key's saved shape differs.
        KeyMismatchError: with ``strict``, keys are missing.
    """
    meta = sorted(k for k, v in target.items() if isinstance(v, torch.Tensor) and v.is_meta)
    if meta:
        raise ConfigError(
            f"load_unsharded: {len(meta)} tensor(s) of the module are on the meta device"
            f" ({', '.join(meta[:5])}{', ...' if len(meta) > 5 else ''}); call"
            " reckpt.sharding.init_parameters(module, 'cpu') first"
        )
    res = resolve_keys(current_shapes(target), saved_shapes(md), param_map=param_map)
    if res.errors:
        lines = [
            f"  {m.key}: checkpoint {list(m.saved or [])}, module {list(m.current or [])}" for m in res.errors
        ]
        raise ShapeMismatchError(
            f"{dcp_dir}: {len(lines)} key(s) cannot be loaded because their shapes differ:\n"
            + "\n".join(lines)
            + "\nBuild the module with the checkpoint's sizes, or map the key elsewhere with param_map."
        )
    if strict and res.missing:
        raise KeyMismatchError(
            f"{dcp_dir}: {len(res.missing)} key(s) of the module are missing from the checkpoint: "
            + ", ".join(sorted(res.missing))
            + ". Map them with param_map, or load with strict=False to keep their values."
        )
    return res


def _stream_tensors(
    storage: Storage, dcp_dir: str, md: Metadata, target: Mapping[str, Any], loads: Mapping[str, str]
) -> list[str]:
    """Stream every streamable tensor into the module, largest first; returns the other keys."""
    rest: list[str] = []
    with torch.no_grad():
        for key in sorted(loads, key=lambda k: -_nbytes(target[k])):
            value = target[key]
            if not (
                isinstance(value, torch.Tensor) and _stream_tensor(storage, dcp_dir, md, loads[key], value)
            ):
                rest.append(key)
    return rest


def _load_rest(
    storage: Storage,
    dcp_dir: str,
    md: Metadata,
    module: torch.nn.Module,
    target: Mapping[str, Any],
    loads: Mapping[str, str],
    batch_bytes: int,
) -> None:
    """What cannot be streamed (non-tensor items, transformed records) goes through DCP, in batches."""
    for group in _batches(target, list(loads), batch_bytes):
        sub = {k: target[k].detach() if isinstance(target[k], torch.Tensor) else target[k] for k in group}
        planner = PartialLoadPlanner(
            warn_on_missing_keys=False, param_map={k: loads[k] for k in group}, source=dcp_dir
        )
        with torch.no_grad():
            load_part(sub, storage, dcp_dir, planner, metadata=md)
        extra = {k: v for k, v in sub.items() if not isinstance(target[k], torch.Tensor)}
        if extra:
            module.load_state_dict(extra, strict=False)


def _settle_managed_collision(module: torch.nn.Module, dcp_dir: str) -> None:
    """What ``load_state_dict`` would run for managed-collision modules: check and re-sort.

    Shards saved by several processes arrive one after another; TorchRec's post-load hook
    (``validate_state``) checks the saved slot ranges cover the module's and re-sorts its ids.
    """
    from reckpt.sharding.mch import ManagedCollisionReshardError, has_managed_collision, mch_modules

    if not has_managed_collision(module):
        return
    for path, mod in mch_modules(module).items():
        try:
            mod.validate_state()
        except AssertionError as e:
            raise ManagedCollisionReshardError(
                f"{dcp_dir}: managed-collision module {path}: the saved slot ranges do not cover this"
                f" module's ({e}); load it into a model with the saved slot count"
            ) from e


def _stream_tensor(storage: Storage, dcp_dir: str, md: Metadata, ckpt_key: str, dest: torch.Tensor) -> bool:
    """Copy every saved chunk of ``ckpt_key`` into ``dest`` in blocks; ``False`` if not streamable.

    A DCP tensor item is a ``torch.save`` archive whose single storage is the chunk's
    contiguous bytes, stored uncompressed: it is read in ``_BLOCK_BYTES`` pieces straight
    into the destination, so no chunk is ever whole in memory (and nothing is unpickled).
    """
    entry = md.state_dict_metadata.get(ckpt_key)
    storage_data = md.storage_data or {}
    if not isinstance(entry, TensorStorageMetadata) or entry.properties.dtype != dest.dtype:
        return False
    plan = []
    for chunk in entry.chunks:
        info = storage_data.get(MetadataIndex(ckpt_key, chunk.offsets))
        if info is None or getattr(info, "transform_descriptors", None):
            return False
        plan.append((chunk, info))
    itemsize = dest.element_size()
    for chunk, info in plan:
        region = dest[tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes, strict=True))]
        shape = tuple(chunk.sizes)
        path = Storage.join(dcp_dir, info.relative_path)
        with storage.open(path) as f, zipfile.ZipFile(Window(f, info.offset, info.length)) as zf:
            member = storage_member(zf, region.numel() * itemsize)
            if member is None:
                return False
            with member_stream(zf, member) as src:
                rows = shape[0] if shape else 1
                row_bytes = region.numel() * itemsize // max(rows, 1)
                step = max(1, _BLOCK_BYTES // max(row_bytes, 1))
                flat = region.reshape(1, *shape) if not shape else region
                if region.is_contiguous():
                    # Straight into the destination's memory, no staging buffer.
                    raw = memoryview(cast(Any, region.reshape(-1).numpy())).cast("B")
                    for start in range(0, len(raw), step * row_bytes):
                        piece = raw[start : start + step * row_bytes]
                        if read_full(src, piece) != len(piece):
                            raise UnsafeCheckpointError(
                                f"{dcp_dir}/{info.relative_path}: [{ckpt_key}] ends early; run reckpt verify"
                            )
                    continue
                for start in range(0, rows, step):
                    n = min(step, rows - start)
                    buf = bytearray(n * row_bytes)
                    if read_full(src, buf) != len(buf):
                        raise UnsafeCheckpointError(
                            f"{dcp_dir}/{info.relative_path}: [{ckpt_key}] ends early; run reckpt verify"
                        )
                    block = torch.frombuffer(buf, dtype=dest.dtype).view(n, *shape[1:])
                    flat[start : start + n].copy_(block)
    return True


def read_rows(
    storage: Storage, dcp_dir: str, md: Metadata, key: str, rows: torch.Tensor
) -> torch.Tensor | None:
    """Rows ``rows`` (global indices) of a saved 2-D tensor, each saved chunk streamed once.

    Only the chunks holding a wanted row are read, in ``_BLOCK_BYTES`` pieces; memory is the
    result plus one block. ``None`` when the checkpoint's records are not plain ``torch.save``
    archives (never the case for DCP-written ones).
    """
    entry = md.state_dict_metadata.get(key)
    storage_data = md.storage_data or {}
    if not isinstance(entry, TensorStorageMetadata) or len(entry.size) != 2:
        return None
    dtype = entry.properties.dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    out = torch.zeros(len(rows), entry.size[1], dtype=dtype)
    for chunk in entry.chunks:
        (r0, c0), (n, m) = chunk.offsets, chunk.sizes
        wanted = ((rows >= r0) & (rows < r0 + n)).nonzero().flatten()
        if len(wanted) == 0:
            continue
        info = storage_data.get(MetadataIndex(key, chunk.offsets))
        if info is None or getattr(info, "transform_descriptors", None):
            return None
        path = Storage.join(dcp_dir, info.relative_path)
        with storage.open(path) as f, zipfile.ZipFile(Window(f, info.offset, info.length)) as zf:
            member = storage_member(zf, n * m * itemsize)
            if member is None:
                return None
            local = rows[wanted] - r0
            step = max(1, _BLOCK_BYTES // max(m * itemsize, 1))
            with member_stream(zf, member) as src:
                for start in range(0, n, step):
                    k = min(step, n - start)
                    buf = bytearray(k * m * itemsize)
                    if read_full(src, buf) != len(buf):
                        raise UnsafeCheckpointError(f"{path}: [{key}] ends early; run reckpt verify")
                    hit = (local >= start) & (local < start + k)
                    if bool(hit.any()):
                        block = torch.frombuffer(buf, dtype=dtype).view(k, m)
                        out[wanted[hit], c0 : c0 + m] = block[local[hit] - start]
    return out


class _NoDist(Dist):
    """Rank 0 of 1 whatever process group exists: this loader runs in one process."""

    def __init__(self) -> None:
        self.active = False
        self.group = None
        self.rank = 0
        self.world_size = 1
