"""DCP ``StorageReader`` on top of :class:`reckpt.storage.core.Storage`: safe metadata, direct reads.

:func:`read_dcp_metadata` unpickles ``.metadata`` through an allow-list and refuses storage
entries that point outside the checkpoint directory. :class:`SafeReader` reads tensor items
straight into their destinations and, with a :class:`~reckpt.format.read_verify.ReadVerifier`,
hashes each data file as it reads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
from typing import IO, TYPE_CHECKING, Any, cast

import torch
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from reckpt.dcp.items import data_offset, read_full
from reckpt.dcp.parallel_read import FileRead, read_files
from reckpt.dcp.writer import StorageFileSystem
from reckpt.errors import UnsafeCheckpointError
from reckpt.format.integrity import SequentialHasher
from reckpt.format.safe_pickle import load_metadata
from reckpt.naming import DCP_METADATA_FILE
from reckpt.storage.core import Storage

if TYPE_CHECKING:
    from reckpt.format.read_verify import ReadVerifier

__all__ = ["SafeReader", "read_dcp_metadata"]

_SAFE_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def _validate_storage_data(md: Metadata, source: str) -> None:
    for index, info in (md.storage_data or {}).items():
        rel = getattr(info, "relative_path", None)
        offset, length = getattr(info, "offset", -1), getattr(info, "length", -1)
        if not isinstance(rel, str) or not _SAFE_FILE.fullmatch(rel) or ".." in rel:
            raise UnsafeCheckpointError(
                f"{source}: entry {getattr(index, 'fqn', index)!r} points at {rel!r}, outside the"
                " checkpoint directory; refusing to read it"
            )
        if not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or length < 0:
            raise UnsafeCheckpointError(
                f"{source}: entry {getattr(index, 'fqn', index)!r} has an invalid byte range"
                f" (offset={offset!r}, length={length!r})"
            )


def _validate_chunk_sizes(md: Metadata, source: str) -> None:
    """Refuse a tensor chunk that claims more bytes than its stored item holds.

    Items are stored uncompressed, so a chunk's bytes fit in its record; a larger claim
    (a crafted shape of terabytes) would otherwise be loaded as its overlapping block.
    """
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

    storage_data = md.storage_data or {}
    for fqn, entry in md.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            continue
        itemsize = torch.empty((), dtype=entry.properties.dtype).element_size()
        for chunk in entry.chunks:
            info = storage_data.get(MetadataIndex(fqn, chunk.offsets))
            if info is None or getattr(info, "transform_descriptors", None):
                continue  # no record of its own, or a compressed one: sizes differ legitimately
            claimed = itemsize * int(torch.Size(chunk.sizes).numel())
            if claimed > int(info.length):
                raise UnsafeCheckpointError(
                    f"{source}: entry {fqn!r} claims a chunk of shape {list(chunk.sizes)} ({claimed} bytes)"
                    f" stored in {int(info.length)} bytes; the metadata is corrupt or crafted, refusing"
                    " to read it"
                )


def read_dcp_metadata(storage: Storage, dcp_dir: str) -> Metadata:
    """Read and validate a DCP directory's ``.metadata`` without executing code.

    Raises:
        CheckpointNotFoundError: there is no ``.metadata``.
        UnsafeCheckpointError: the pickle or its storage entries are not acceptable.
    """
    path = Storage.join(dcp_dir, DCP_METADATA_FILE)
    md = cast(Metadata, load_metadata(storage.read_bytes(path), path))
    _validate_storage_data(md, path)
    _validate_chunk_sizes(md, path)
    return md


def _fileno(stream: IO[bytes]) -> int | None:
    """The stream's file descriptor, or ``None`` when it has none (not a local file)."""
    try:
        return int(stream.fileno())
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


class SafeReader(FileSystemReader):
    """DCP ``StorageReader`` that reads metadata safely and through :class:`Storage`.

    Non-tensor items are handed to the planner's ``load_bytes``; use it with
    :class:`reckpt.dcp.planner.PartialLoadPlanner`, which loads them with
    ``weights_only=True``.
    """

    def __init__(
        self,
        path: str,
        storage: Storage,
        metadata: Metadata | None = None,
        *,
        verifier: ReadVerifier | None = None,
        part: str = "",
    ) -> None:
        super().__init__(path)
        self.fs = cast(Any, StorageFileSystem(storage, path, ""))
        self.path = path
        self._dir = path
        self._storage = storage
        self._metadata = metadata
        self._verifier = verifier
        self._part = part
        self.direct_items = 0  # tensor items read straight into their destination
        self.dcp_items = 0  # items that took DCP's own path

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Read tensor items straight into their destinations; DCP's own path for the rest.

        A tensor item that fills a contiguous CPU destination exactly (same dtype, the whole
        saved chunk) is read into the destination's memory; every other item (non-tensor, a
        slice of a chunk, a strided or converted destination) goes through
        :meth:`FileSystemReader.read_data`. With a verifier, a file this rank reads mostly
        (at least half its bytes) is read exactly once, every byte hashed on the way, and
        its checksum reported to the verifier.

        On a local file system all files of the part are read at once by several threads
        (:mod:`reckpt.dcp.parallel_read`: large ``pread`` calls in file order, hashed in order
        as they arrive); elsewhere each file is read front to back through its stream.
        """
        per_file: dict[str, list[ReadItem]] = {}
        rest: list[ReadItem] = []
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                rest.append(item)
            else:
                per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        with contextlib.ExitStack() as stack:
            batch: list[tuple[FileRead, str, str | None, list[tuple[ReadItem, torch.Tensor]]]] = []
            for relative_path, items in per_file.items():
                items.sort(key=lambda it: self.storage_data[it.storage_index].offset)
                path = os.fspath(self.fs.concat_path(self.path, relative_path))
                rel = f"{self._part}/{relative_path}" if self._part else relative_path
                record = self._verifier.record(rel) if self._verifier is not None else None
                if record is not None and 2 * self._planned_bytes(items) < record.size:
                    record = None  # mostly other ranks' bytes: checked once after the load instead
                stream = cast(IO[bytes], stack.enter_context(self.fs.create_stream(path, "rb")))
                fd = _fileno(stream) if self._storage.local else None
                if fd is None:
                    rest += self._read_file(stream, path, rel if record is not None else None, items, planner)
                    continue
                spans: list[tuple[int, memoryview]] = []
                direct: list[tuple[ReadItem, torch.Tensor]] = []
                end = 0
                for it in items:
                    found = self._locate(stream, it, planner)
                    if found is None or found[2] < end:
                        rest.append(it)
                        continue
                    target, view, start = found
                    spans.append((start, view))
                    direct.append((it, target))
                    end = start + len(view)
                read = FileRead(fd, spans, hash_all=record is not None)
                batch.append((read, path, rel if record is not None else None, direct))
            read_files([read for read, _, _, _ in batch])
            for read, path, hashed, direct in batch:
                if hashed is not None:
                    cast("ReadVerifier", self._verifier).read_whole(hashed, read.size, read.checksum)
                if read.short:
                    raise UnsafeCheckpointError(f"{path}: the file ends early; run reckpt verify")
                for it, target in direct:
                    planner.commit_tensor(it, target)
        self.direct_items += len(plan.items) - len(rest)
        self.dcp_items += len(rest)
        if rest:
            return super().read_data(dataclasses.replace(plan, items=rest), planner)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _read_file(
        self,
        stream: IO[bytes],
        path: str,
        hashed: str | None,
        items: list[ReadItem],
        planner: LoadPlanner,
    ) -> list[ReadItem]:
        """Read one file's items front to back through ``stream``; the items left to DCP.

        With ``hashed`` (the file's path in the manifest), every byte is hashed on the way
        and the file's checksum reported to the verifier.
        """
        with contextlib.ExitStack() as stack:
            locate, seq = stream, None
            if hashed is not None:
                # a second handle finds items (random access) while the first reads in order
                locate = cast(IO[bytes], stack.enter_context(self.fs.create_stream(path, "rb")))
                seq = SequentialHasher(stream)
                stack.callback(seq.close)
            rest = [it for it in items if not self._read_direct(locate, seq, it, planner)]
            if seq is not None:
                cast("ReadVerifier", self._verifier).read_whole(cast(str, hashed), *seq.finish())
        return rest

    def _planned_bytes(self, items: list[ReadItem]) -> int:
        indexes = {it.storage_index for it in items}
        return sum(int(self.storage_data[i].length) for i in indexes)

    def _locate(
        self, stream: IO[bytes], item: ReadItem, planner: LoadPlanner
    ) -> tuple[torch.Tensor, memoryview, int] | None:
        """Where a tensor item's bytes are and where they go: ``(target, its bytes, offset)``.

        ``None`` when the item needs DCP's path (a slice of a chunk, a converted or strided
        destination, not a single uncompressed storage).
        """
        info = self.storage_data[item.storage_index]
        if info.transform_descriptors or any(item.storage_offsets):
            return None
        target = planner.resolve_tensor(item).detach()
        saved = self._saved_dtype(item)
        if target.device.type != "cpu" or not target.is_contiguous() or saved != target.dtype:
            return None
        view = memoryview(cast(Any, target.reshape(-1).view(torch.uint8).numpy())).cast("B")
        start = data_offset(stream, info.offset, info.length, len(view))
        return None if start is None else (target, view, start)

    def _read_direct(
        self, stream: IO[bytes], seq: SequentialHasher | None, item: ReadItem, planner: LoadPlanner
    ) -> bool:
        """Read one tensor item into its destination; ``False`` if it needs DCP's path.

        ``stream`` locates the item's bytes (random access); with ``seq`` the bytes are then
        read through it, in file order, hashed.
        """
        found = self._locate(stream, item, planner)
        if found is None:
            return False
        target, view, start = found
        if seq is not None and start < seq.pos:
            return False
        if seq is None:
            stream.seek(start)
            got = read_full(stream, view)
        else:
            seq.skip_to(start)
            got = seq.readinto(view)
            seq.wait()
        if got != len(view):
            info = self.storage_data[item.storage_index]
            where = f"{self.path}/{info.relative_path}"
            raise UnsafeCheckpointError(
                f"{where}: item {item.storage_index.fqn!r} ends early; run reckpt verify"
            )
        planner.commit_tensor(item, target)
        return True

    def _saved_dtype(self, item: ReadItem) -> torch.dtype | None:
        md = self._metadata or getattr(self, "_loaded_metadata", None)
        entry = md.state_dict_metadata.get(item.storage_index.fqn) if md is not None else None
        return getattr(getattr(entry, "properties", None), "dtype", None)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        md = self._metadata or read_dcp_metadata(self._storage, self._dir)
        self._loaded_metadata = md
        meta = md.storage_meta if md.storage_meta is not None else StorageMeta()
        meta.load_id = self.load_id
        md.storage_meta = meta
        return md

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return True
