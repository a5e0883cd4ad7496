"""Restoring a delta checkpoint: its chain of links, base first.

Restoring a delta (``restore_model`` dispatches it here) checks that every link exists, is
committed and verifies, reads every link's rows, then restores the base with the engine
(:func:`~reckpt.restore.single.restore_one`), applies the rows link by link, and finally the
delta's own dense part with the engine again (no call back into ``restore_model``). Raw
deltas are lossless; int8/fp16 deltas (``encoding``) are serving dumps and restore only
with ``allow_lossy=True``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from reckpt.commit.state import checkpoint_state
from reckpt.delta.rows import RowPiece, apply_pieces, decode_index
from reckpt.dist import Dist
from reckpt.dynamic.load import read_dynamic
from reckpt.errors import (
    CheckpointNotFoundError,
    ConfigError,
    IntegrityError,
    ShapeMismatchError,
)
from reckpt.format.integrity import checksum_bytes
from reckpt.format.manifest import Manifest, chain_names, read_manifest
from reckpt.format.verification import verify_collective
from reckpt.naming import (
    DELTA_ROWS_DIR,
    DYNAMICEMB_DIR,
    MODEL_DIR,
    OPTIMIZER_DIR,
    basename,
    parse_step,
)
from reckpt.optim import init_optimizer_state, load_optimizer_state_dict, optimizer_state_dict
from reckpt.remap import SKIP
from reckpt.report import LoadReport
from reckpt.restore.single import restore_one
from reckpt.restore.target import RestoreOptions, Target
from reckpt.storage.core import Storage

__all__ = ["restore_chain"]

logger = logging.getLogger(__name__)


def _read_link_rows(storage: Storage, path: str, manifest: Manifest) -> list[RowPiece]:
    """Every rank's rows of one link, each file checked against the manifest first."""
    blobs: dict[str, bytes] = {}
    for rel, rec in sorted(manifest.files.items()):
        if not rel.startswith(f"{DELTA_ROWS_DIR}/"):
            continue
        full = Storage.join(path, rel)
        if not storage.exists(full):
            raise IntegrityError(f"{full}: delta rows file is missing")
        data = storage.read_bytes(full)
        if len(data) != rec.size or checksum_bytes(data) != rec.checksum:
            raise IntegrityError(
                f"{full}: delta rows file is corrupted (size or checksum differs from the manifest)"
            )
        blobs[rel] = data
    pieces: list[RowPiece] = []
    for rel in sorted(r for r in blobs if r.endswith(".json")):
        bin_rel = rel.removesuffix(".json") + ".bin"
        if bin_rel not in blobs:
            raise IntegrityError(f"{Storage.join(path, bin_rel)}: delta rows file is missing")
        pieces += decode_index(blobs[rel], blobs[bin_rel], Storage.join(path, rel))
    return pieces


def _links(target: Target, allow_lossy: bool) -> list[Target]:
    """The chain's links, base first, each checked committed and consistent (the last is ``target``)."""
    storage, ckpt, manifest = target.storage, target.path, target.manifest
    root = Storage.parent(ckpt)
    names = chain_names(manifest, ckpt)
    out: list[Target] = []
    for i, name in enumerate(names):
        path = Storage.join(root, name)
        state = checkpoint_state(storage, path)
        if state == "absent":
            raise CheckpointNotFoundError(f"{ckpt}: its chain is broken: link {path} does not exist")
        if state == "incomplete":
            raise IntegrityError(f"{ckpt}: its chain is broken: link {path} was never committed")
        m = manifest if i == len(names) - 1 else read_manifest(storage, path)
        if i == 0:
            if parse_step(name) is None or (m is not None and m.delta is not None):
                raise IntegrityError(f"{ckpt}: its chain is broken: base {path} is not a full checkpoint")
        elif m is None or m.delta is None or chain_names(m, path) != names[: i + 1]:
            raise IntegrityError(f"{ckpt}: its chain is broken: {path} is not the delta the chain expects")
        elif not m.delta.get("lossless", True) and not allow_lossy:
            raise ConfigError(
                f"{path} is a lossy ({m.delta.get('encoding')}) delta dump;"
                " pass allow_lossy=True to restore it"
            )
        out.append(Target(path, storage, state, m, target.d))
    return out


def restore_chain(
    target: Target,
    model: torch.nn.Module,
    optimizer: Any,
    opts: RestoreOptions,
    *,
    allow_lossy: bool = False,
) -> LoadReport:
    """Collective: restore a delta checkpoint: base, then each link's rows, then its dense part.

    Every rank reads and checks every link's row files before anything is loaded (a broken
    or corrupt link raises naming it, with the model untouched), restores the base with the
    engine (:func:`~reckpt.restore.single.restore_one`), applies the rows it holds shards of,
    upserts dynamic rows, and restores the delta's own files with the engine again. So the
    engine runs twice, on the base and on the delta; the links between contribute rows only.

    Args:
        target: the delta checkpoint, resolved (its storage serves every link).
        model: the model to fill.
        optimizer: optional; its state is initialised, then loaded from the links.
        opts: the caller's options (renames are refused: see Raises).
        allow_lossy: allow int8/fp16 delta dumps in the chain.

    Raises:
        ConfigError: a parameter map or rename rules were given, or a link is lossy and
            ``allow_lossy`` is off.
        CheckpointNotFoundError, IntegrityError: a link is missing, uncommitted, corrupt or
            not the one the chain expects (nothing has been loaded).
        ShapeMismatchError: a link's rows do not fit the current tensors (nothing loaded).
    """
    for arg in ("ckpt_param_map_path", "param_map", "rename_rules"):
        if getattr(opts, arg):
            raise ConfigError(
                f"{arg} is not supported when restoring a delta checkpoint ({target.path});"
                " restore it and save a full checkpoint first"
            )
    links = _links(target, allow_lossy)
    rows = [
        (link.path, _read_link_rows(link.storage, link.path, link.manifest))
        for link in links[1:]
        if link.manifest is not None
    ]
    if opts.verify and target.manifest is not None:  # the delta's own files, before the base is loaded
        verify_collective(target.storage, target.path, target.manifest, target.d)
    with_optim = optimizer is not None and opts.load_optimizer
    if with_optim:
        init_optimizer_state(optimizer)  # its shapes are checked below; restore would do it anyway
    _check_shapes(rows, _targets(model, optimizer if with_optim else None)[2])
    base_report = restore_one(links[0], model, optimizer, opts)
    chained = _apply_rows(rows, model, optimizer if with_optim else None, target.d)
    # the last link's dynamic rows come with its own restore below (an upsert, like these)
    _load_dynamic_links(model, links[1:-1], target.d)
    # The rows of the tracked tables are in place: the delta's own model/ lacks them on purpose.
    own = replace(opts, error_on_missing_keys=False, param_map=dict.fromkeys(chained, SKIP), verify=False)
    report = restore_one(target, model, optimizer, own)
    mp = report.part(MODEL_DIR)
    mp.missing = [k for k in mp.missing if k not in chained]
    mp.reinitialized = [k for k in mp.reinitialized if k not in chained]
    mp.loaded = sorted({*mp.loaded, *chained})
    report.verified = base_report.verified
    report.notes.append(
        f"restored the chain {[basename(link.path) for link in links]} ({len(chained)} tables by rows)"
    )
    return report


def _apply_rows(
    rows: list[tuple[str, list[RowPiece]]], model: torch.nn.Module, optimizer: Any, d: Dist
) -> set[str]:
    """Collective: write every link's rows, in chain order, into the model (and ``optimizer``,
    when given); each rank writes the rows of the shards it holds. Returns the model keys
    filled this way."""
    sd, osd, targets = _targets(model, optimizer)
    chained: set[str] = set()
    for path, pieces in rows:
        by_key: dict[tuple[str, str], list[RowPiece]] = {}
        for p in pieces:
            by_key.setdefault((p.part, p.key), []).append(p)
        for (part, key), group in by_key.items():
            target = targets.get((part, key))
            if target is None:
                if part == MODEL_DIR or optimizer is not None:
                    logger.warning(
                        "%s: rows of %s/%s have no tensor in the current model; skipped", path, part, key
                    )
                continue
            with torch.no_grad():
                apply_pieces(target, group, d)
            if part == MODEL_DIR:
                chained.add(key)
    with torch.no_grad():
        model.load_state_dict(sd, strict=False)
    if osd is not None:
        load_optimizer_state_dict(model, optimizer, osd)
    return chained


def _targets(
    model: torch.nn.Module, optimizer: Any
) -> tuple[dict[str, Any], dict[str, Any] | None, dict[tuple[str, str], Any]]:
    """Model and optimizer state dicts, and (part, flattened key) -> the tensor rows go into."""
    sd = model.state_dict()
    osd = optimizer_state_dict(model, optimizer, "name") if optimizer is not None else None
    targets: dict[tuple[str, str], Any] = {(MODEL_DIR, k): v for k, v in sd.items()}
    for k, st in (osd or {}).get("state", {}).items():
        targets.update({(OPTIMIZER_DIR, f"state.{k}.{leaf}"): v for leaf, v in st.items()})
    return sd, osd, targets


def _check_shapes(rows: list[tuple[str, list[RowPiece]]], targets: Mapping[tuple[str, str], Any]) -> None:
    """Every piece fits its current tensor's global shape (checked before anything is loaded).

    Raises:
        ShapeMismatchError: naming the link and the key (a table resized, or row-wise optimizer
            state laid out for another sharding plan).
    """
    for path, pieces in rows:
        for p in pieces:
            t = targets.get((p.part, p.key))
            if t is not None and tuple(int(n) for n in t.shape) != p.shape:
                raise ShapeMismatchError(
                    f"{path}: rows of {p.part}/{p.key} were saved for shape {list(p.shape)}, the current"
                    f" tensor has shape {[int(n) for n in t.shape]} (a table resized, or optimizer state"
                    " of another sharding plan); restore the chain with the model and plan it was saved"
                    " with, then save a full checkpoint"
                )


def _load_dynamic_links(model: torch.nn.Module, links: Sequence[Target], d: Dist) -> None:
    """Collective: upsert each link's dynamic rows, in chain order."""
    for link in links:
        if link.manifest is not None and any(r.startswith(f"{DYNAMICEMB_DIR}/") for r in link.manifest.files):
            read_dynamic(link.storage, link.path, model, process_group=d.group).apply(upsert=True)
