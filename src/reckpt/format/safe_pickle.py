"""Loading pickled DCP metadata and non-tensor items without running code.

DCP stores ``.metadata`` as a plain pickle and reads non-tensor items with
``torch.load(weights_only=False)``: either runs arbitrary code from a crafted
checkpoint. reckpt reads ``.metadata`` with an unpickler that only resolves an
allow-list of classes, and non-tensor items with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import pickle
from typing import IO, Any

import torch

from reckpt.errors import UnsafeCheckpointError

__all__ = ["load_metadata", "load_item_bytes"]

_ALLOWED: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset(
        {
            "Metadata",
            "TensorStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "BytesStorageMetadata",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.distributed.checkpoint.planner": frozenset({"WriteItemType", "LoadItemType"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size"}),
    "pathlib": frozenset({"PosixPath", "PurePosixPath", "Path"}),
    "collections": frozenset({"OrderedDict"}),
    "builtins": frozenset({"set", "frozenset", "tuple", "list", "dict", "slice"}),
}


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], source: str) -> None:
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype | torch.memory_format):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self._source}: refusing to load {module}.{name}: DCP metadata may only reference"
            " checkpoint metadata classes. The file is corrupt or was crafted to run code;"
            " do not load it with plain torch.distributed.checkpoint either."
        )


def load_metadata(data: bytes, source: str) -> Any:
    """Unpickle DCP ``Metadata`` from ``data``, resolving only allow-listed classes.

    Args:
        data: the content of a ``.metadata`` file.
        source: the file's path, for error messages.

    Raises:
        UnsafeCheckpointError: the pickle references anything outside the allow-list, or
            is not DCP metadata at all.
    """
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        obj = _AllowListUnpickler(io.BytesIO(data), source).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # truncated or garbled pickle
        raise UnsafeCheckpointError(f"{source}: not a readable DCP metadata file ({e})") from e
    if not isinstance(obj, Metadata):
        raise UnsafeCheckpointError(f"{source}: holds a {type(obj).__name__}, not DCP Metadata")
    return obj


def load_item_bytes(value: IO[bytes], source: str) -> Any:
    """Load one non-tensor DCP item (e.g. an optimizer hyper-parameter) safely."""
    try:
        return torch.load(value, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{source}: a non-tensor item holds objects that are not plain data ({e}); refusing"
            " to unpickle it"
        ) from e
