"""Small files a save writes beside the DCP parts, and the manifest record of each."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from reckpt.format.integrity import FileRecord, checksum_bytes
from reckpt.storage.core import Storage

__all__ = ["FileWriter", "json_record", "write_record"]

FileWriter = Callable[[Storage, str], dict[str, FileRecord]]
"""Writes files of its own into a save's work directory; called on every rank.

Called as ``writer(storage, work_dir)`` after the DCP parts; returns the records (path
relative to the checkpoint -> size and checksum) of what this rank wrote, best made with
:func:`write_record`. Paths must be unique across ranks (put the rank in the name).
"""


def write_record(storage: Storage, work: str, name: str, data: bytes | memoryview) -> FileRecord:
    """Write ``<work>/<name>`` (fsynced) and return its manifest record."""
    storage.write_bytes(Storage.join(work, name), bytes(data) if isinstance(data, memoryview) else data)
    return FileRecord(name, len(data), checksum_bytes(data))


def json_record(storage: Storage, work: str, name: str, doc: Any) -> FileRecord:
    """Write ``doc`` (JSON-encoded unless already bytes) as ``<work>/<name>``; its record."""
    data = doc if isinstance(doc, bytes) else json.dumps(doc).encode("utf-8")
    return write_record(storage, work, name, data)
