"""reckpt's JSON documents inside a checkpoint: the manifest and mutable sidecars.

The manifest (``reckpt.json``) is written once, last, by rank 0; on object stores its
existence is the commit marker. It lists every tensor entry and every file with its
size and checksum. A committed checkpoint is immutable: what is learnt later (eval
metrics, timings, a refreshed dataloader state) goes into sidecars
(``reckpt.<kind>.sidecar.json``), each replaced atomically and carrying the checksum of
its own payload. Schema: ``docs/format.md``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from reckpt.errors import IntegrityError
from reckpt.format.integrity import CHECKSUM_ALGORITHM, FileRecord, checksum_bytes
from reckpt.naming import MANIFEST_FILE, sidecar_name
from reckpt.storage.core import Storage

if TYPE_CHECKING:  # torch is imported lazily: discovery and `reckpt ls` do not need it
    from torch.distributed.checkpoint.metadata import Metadata

__all__ = [
    "FORMAT_VERSION",
    "TensorEntry",
    "Manifest",
    "entries_from_metadata",
    "read_manifest",
    "write_sidecar",
    "read_sidecar",
]

FORMAT_VERSION = 1
_SIDECAR_VERSION = 1


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One DCP entry: a tensor (shape, dtype, bytes) or a non-tensor item (``dtype=None``)."""

    name: str
    shape: list[int] | None
    dtype: str | None
    bytes: int


def entries_from_metadata(md: Metadata) -> list[TensorEntry]:
    """Tensor entries of a DCP checkpoint, sorted by name, from its metadata."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    out = []
    for name, item in md.state_dict_metadata.items():
        if isinstance(item, BytesStorageMetadata):
            size = sum(
                int(getattr(info, "length", 0))
                for idx, info in (md.storage_data or {}).items()
                if getattr(idx, "fqn", None) == name
            )
            out.append(TensorEntry(name, None, None, size))
            continue
        numel = 1
        for d in item.size:
            numel *= int(d)
        dtype = item.properties.dtype
        out.append(
            TensorEntry(
                name, [int(d) for d in item.size], str(dtype).removeprefix("torch."), numel * dtype.itemsize
            )
        )
    return sorted(out, key=lambda e: e.name)


@dataclass(slots=True)
class Manifest:
    """The content of ``reckpt.json``.

    Attributes:
        step: the checkpoint's step (``None`` for a directory not named ``model.ckpt-<step>``).
        world_size: number of processes that saved it.
        entries: part (``model``, ``optimizer``, extra names) -> its tensor entries.
        files: relative path -> (size, checksum) of every file except the manifest and sidecars.
        user_metadata: free-form JSON-serialisable data given to ``save_model``.
        delta: for an incremental checkpoint (``model.delta-<step>``): ``{"base": name of the
            full checkpoint, "parent": name of the previous link, "chain": [base, deltas ...]}``
            and what it holds (see ``reckpt.delta.save``); ``None`` for a full checkpoint.
    """

    step: int | None
    world_size: int
    entries: dict[str, list[TensorEntry]] = field(default_factory=dict)
    files: dict[str, FileRecord] = field(default_factory=dict)
    user_metadata: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    format_version: int = FORMAT_VERSION
    library_version: str = ""
    checksum_algorithm: str = CHECKSUM_ALGORITHM
    delta: dict[str, Any] | None = None

    def to_json(self) -> bytes:
        doc = {
            "format_version": self.format_version,
            "library_version": self.library_version,
            "checksum_algorithm": self.checksum_algorithm,
            "step": self.step,
            "world_size": self.world_size,
            "created_at": self.created_at,
            "entries": {part: [asdict(e) for e in es] for part, es in sorted(self.entries.items())},
            "files": {p: {"size": r.size, "checksum": r.checksum} for p, r in sorted(self.files.items())},
            "user_metadata": self.user_metadata,
        }
        if self.delta is not None:
            doc["delta"] = self.delta
        doc["manifest_checksum"] = _self_checksum(doc)  # a flipped bit anywhere is caught
        return json.dumps(doc, indent=1, sort_keys=False).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes, source: str, *, check: bool = True) -> Manifest:
        """Parse and validate a manifest (``check=False`` skips its own checksum: salvage only).

        Raises:
            IntegrityError: the file is not valid JSON or does not follow the schema.
        """
        try:
            doc = json.loads(data.decode("utf-8"))
            recorded = doc.pop("manifest_checksum", None)  # absent in older manifests: accepted unchecked
            version = doc["format_version"]
            if not isinstance(version, int) or version > FORMAT_VERSION:
                raise IntegrityError(
                    f"{source}: format_version {version!r} is newer than this reckpt understands"
                    f" ({FORMAT_VERSION}); upgrade reckpt"
                )
            if check and recorded is not None and recorded != _self_checksum(doc):
                raise IntegrityError(
                    f"{source}: the manifest's own checksum does not match its content (corrupted);"
                    " restore from another checkpoint"
                )
            files = {}
            for path, rec in doc["files"].items():
                if path.startswith("/") or ".." in path.split("/") or "\\" in path:
                    raise IntegrityError(f"{source}: file entry {path!r} points outside the checkpoint")
                files[path] = FileRecord(path, int(rec["size"]), str(rec["checksum"]))
            entries = {
                part: [TensorEntry(e["name"], e["shape"], e["dtype"], int(e["bytes"])) for e in es]
                for part, es in doc["entries"].items()
            }
            return cls(
                step=doc["step"],
                world_size=int(doc["world_size"]),
                entries=entries,
                files=files,
                user_metadata=dict(doc.get("user_metadata") or {}),
                created_at=float(doc["created_at"]),
                format_version=version,
                library_version=str(doc.get("library_version", "")),
                checksum_algorithm=str(doc["checksum_algorithm"]),
                delta=None if doc.get("delta") is None else dict(doc["delta"]),
            )
        except IntegrityError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise IntegrityError(f"{source}: not a valid reckpt manifest ({type(e).__name__}: {e})") from e


def _self_checksum(doc: dict[str, Any]) -> str:
    """Checksum of a manifest document in canonical form (sorted keys, no spaces)."""
    return checksum_bytes(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8"))


def read_json_object(storage: Storage, path: str) -> dict[str, Any] | None:
    """A small JSON-object file of a checkpoint (``plan``, ``meta`` ...), ``None`` when absent.

    Raises:
        IntegrityError: the file is not valid JSON or not an object.
    """
    if not storage.exists(path):
        return None
    try:
        doc = json.loads(storage.read_text(path))
    except (ValueError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(doc, dict):
        raise IntegrityError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    return doc


def chain_names(manifest: Manifest | None, path: str) -> list[str]:
    """Names of the links a checkpoint needs, itself last (a full checkpoint: ``[itself]``)."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if manifest is None or manifest.delta is None:
        return [name]
    return [*(str(n) for n in manifest.delta["chain"]), name]


def read_manifest(storage: Storage, checkpoint_dir: str, *, check: bool = True) -> Manifest | None:
    """The checkpoint's manifest, or ``None`` when it has none (legacy or incomplete).

    ``check=False`` skips the manifest's own checksum (``restore_model(verify=False)``).
    """
    path = Storage.join(checkpoint_dir, MANIFEST_FILE)
    if not storage.exists(path):
        return None
    return Manifest.from_json(storage.read_bytes(path), path, check=check)


def write_sidecar(storage: Storage, checkpoint_dir: str, kind: str, payload: dict[str, Any]) -> None:
    """Atomically replace the ``kind`` sidecar of a checkpoint (rank 0 only).

    Example:
        >>> # write_sidecar(st, "run/model.ckpt-9", "metrics", {"auc": 0.71})
    """
    body = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    doc = {
        "sidecar_version": _SIDECAR_VERSION,
        "kind": kind,
        "checksum_algorithm": CHECKSUM_ALGORITHM,
        "checksum": checksum_bytes(body.encode("utf-8")),
        "payload": payload,
    }
    path = Storage.join(checkpoint_dir, sidecar_name(kind))
    storage.write_bytes_atomic(path, json.dumps(doc, indent=1).encode("utf-8"))


def read_sidecar(storage: Storage, checkpoint_dir: str, kind: str) -> dict[str, Any] | None:
    """The payload of the ``kind`` sidecar, ``None`` when absent.

    Raises:
        IntegrityError: the sidecar is garbled or its checksum does not match.
    """
    path = Storage.join(checkpoint_dir, sidecar_name(kind))
    if not storage.exists(path):
        return None
    try:
        doc = json.loads(storage.read_bytes(path).decode("utf-8"))
        payload = doc["payload"]
        body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")
        ok = checksum_bytes(body) == doc["checksum"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{path}: garbled sidecar ({type(e).__name__}: {e})") from e
    if not ok or not isinstance(payload, dict):
        raise IntegrityError(f"{path}: sidecar checksum mismatch; the file was modified or corrupted")
    return payload
