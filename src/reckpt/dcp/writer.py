"""DCP storage writer on top of :class:`reckpt.storage.core.Storage` (the reader: :mod:`reckpt.dcp.reader`).

The writer records the size and checksum of every file it writes (data shards and
``.metadata``) while writing, so the manifest costs no second read; it hands DCP aliases of
views instead of clones and writes without ``torch.save``'s zip CRC.

Call sequence (DCP's own): every rank ``set_up_storage_writer`` -> ``prepare_local_plan``
-> (coordinator) ``prepare_global_plan`` -> every rank ``write_data`` -> (coordinator)
``finish``; afterwards each rank's :attr:`ReckptWriter.records` holds what it wrote.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import warnings
from collections.abc import Generator
from typing import Any, cast

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystemBase, FileSystemWriter
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from reckpt.dcp.direct_write import DirectWriter, open_direct
from reckpt.format.integrity import FileRecord, HashingWriter
from reckpt.storage.core import Storage
from reckpt.storage.fork_lock import ForkSafeLock

__all__ = [
    "ReckptSavePlanner",
    "ReckptWriter",
    "StorageFileSystem",
    "dcp_call",
    "exact_storage_view",
    "writer_threads",
    "zip_crc32_off",
]


def _plain_local_path(storage: Storage, path: str) -> str | None:
    """``path`` on the local disk when ``storage`` is fsspec's plain local file system, else None.

    Wrappers (the ``faulty://`` file system of the fault-injection tests) count as not local
    here: writing around them would bypass what they inject.
    """
    from fsspec.implementations.local import LocalFileSystem

    if not storage.local or type(storage.fs) is not LocalFileSystem:
        return None
    return str(storage.fs._strip_protocol(path))


class StorageFileSystem(FileSystemBase):
    """DCP's filesystem seam, backed by :class:`Storage`, recording written files."""

    def __init__(self, storage: Storage, root: str, rel_prefix: str) -> None:
        self.storage = storage
        self.root = root.rstrip("/")
        self.rel_prefix = rel_prefix
        self.records: dict[str, FileRecord] = {}
        self._lock = threading.Lock()

    def _rel(self, path: str) -> str:
        tail = path[len(self.root) + 1 :] if path.startswith(self.root + "/") else path
        return f"{self.rel_prefix}/{tail}" if self.rel_prefix else tail

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Generator[io.IOBase, None, None]:
        path = os.fspath(path)
        if "w" not in mode:
            with self.storage.open(path, "rb") as f:
                yield cast(io.IOBase, f)
            return
        rel = self._rel(path)

        def on_close(size: int, checksum: str) -> None:
            with self._lock:
                self.records[rel] = FileRecord(rel, size, checksum)

        raw: Any = self.storage.open(path, "wb")
        local = _plain_local_path(self.storage, path)
        fd = open_direct(local) if local is not None else None
        if fd is not None:  # straight to the disk (reckpt.dcp.direct_write); else early writeback
            raw = DirectWriter(raw, fd, path)
        stream = HashingWriter(raw, on_close, writeback=self.storage.local and fd is None)
        try:
            yield stream
        except BaseException as e:
            with contextlib.suppress(Exception):  # the write's own error is the one to report
                stream.close()
            self.rm_file(path)
            failed = getattr(raw, "error", None)
            if failed is not None and failed is not e:
                # torch.save finishes its zip archive in __exit__ even after a failed write,
                # and that second error ("unexpected pos ...") replaces the storage error that
                # names the path and the cause (ENOSPC ...).
                raise failed from e
            raise
        stream.close()

    def concat_path(self, path: str | os.PathLike[str], suffix: str) -> str:
        return Storage.join(os.fspath(path), suffix)

    def init_path(self, path: str | os.PathLike[str]) -> str:
        return os.fspath(path)

    def rename(self, path: str | os.PathLike[str], new_path: str | os.PathLike[str]) -> None:
        src, dst = os.fspath(path), os.fspath(new_path)
        self.storage.rename(src, dst)
        with self._lock:
            rec = self.records.pop(self._rel(src), None)
            if rec is not None:
                self.records[self._rel(dst)] = FileRecord(self._rel(dst), rec.size, rec.checksum)

    def mkdir(self, path: str | os.PathLike[str]) -> None:
        self.storage.makedirs(os.fspath(path))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return True

    def exists(self, path: str | os.PathLike[str]) -> bool:
        return self.storage.exists(os.fspath(path))

    def rm_file(self, path: str | os.PathLike[str]) -> None:
        self.storage.rm(os.fspath(path))
        with self._lock:
            self.records.pop(self._rel(os.fspath(path)), None)

    def ls(self, path: str | os.PathLike[str]) -> list[str]:
        return self.storage.ls(os.fspath(path))


_crc_lock = ForkSafeLock()
_crc_users = 0
_crc_saved = True


@contextlib.contextmanager
def zip_crc32_off() -> Generator[None, None, None]:
    """Turn off ``torch.save``'s zip CRC-32 while any caller is inside (reference-counted)."""
    global _crc_users, _crc_saved
    with _crc_lock:
        if _crc_users == 0:
            _crc_saved = torch.serialization.get_crc32_options()
            torch.serialization.set_crc32_options(False)
        _crc_users += 1
    try:
        yield
    finally:
        with _crc_lock:
            _crc_users -= 1
            if _crc_users == 0:
                torch.serialization.set_crc32_options(_crc_saved)


def exact_storage_view(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` backed by a storage of exactly its own bytes, sharing its memory (no copy).

    DCP's writer clones every tensor whose storage is larger than the tensor (a table that is
    a view into TorchRec's flat TBE weights, a row range of a bigger tensor), because
    ``torch.save`` writes whole storages. A contiguous CPU view gets an alias over just its
    bytes instead: the same bytes reach the file with no copy and no allocation.
    """
    if (
        tensor.device.type != "cpu"
        or not tensor.is_contiguous()
        or tensor.numel() == 0
        or tensor.untyped_storage().nbytes() == tensor.nbytes
    ):
        return tensor
    raw = memoryview(cast(Any, tensor.detach().reshape(-1).view(torch.uint8).numpy())).cast("B")
    return torch.frombuffer(raw, dtype=torch.uint8).view(tensor.dtype).view(tensor.shape)


_BYTES_PER_WRITER = 256 << 20
_MAX_WRITERS = 4


def writer_threads(state_dict: dict[str, Any]) -> int:
    """Writer threads for this rank's share of a part: one per 256 MiB begun, at most four.

    One sequential stream leaves a disk idle between requests (and a rate-limited cloud
    volume gives more to several streams); a small part is not worth splitting into files.
    Rounding up keeps the files even: 1 GiB of four 264 MB tables gets four files, not three
    with one twice as long (written alone at the end).
    """
    total = 0

    def visit(value: Any) -> None:
        nonlocal total
        if isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif callable(getattr(value, "local_shards", None)):
            total += sum(int(s.tensor.nbytes) for s in value.local_shards())
        elif callable(getattr(value, "to_local", None)):
            total += int(value.to_local().nbytes)
        elif isinstance(value, torch.Tensor):
            total += int(value.nbytes)

    visit(state_dict)
    return max(1, min(_MAX_WRITERS, -(-total // _BYTES_PER_WRITER)))


class ReckptSavePlanner(DefaultSavePlanner):
    """DCP's default save planner, handing the writer exact-storage aliases of views."""

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        data = super().resolve_data(write_item)
        return exact_storage_view(data) if isinstance(data, torch.Tensor) else data


class ReckptWriter(FileSystemWriter):
    """DCP ``StorageWriter`` writing through :class:`Storage` and recording checksums.

    Args:
        path: the DCP directory (e.g. ``<staging>/model``).
        storage: the storage of ``path``.
        rel_prefix: prefix of recorded paths, relative to the checkpoint root (``"model"``).
        thread_count: writer threads per rank.
    """

    def __init__(self, path: str, storage: Storage, rel_prefix: str, thread_count: int = 1) -> None:
        super().__init__(
            path,
            single_file_per_rank=True,
            sync_files=storage.local,
            thread_count=thread_count,
            overwrite=True,
        )
        self._recording = StorageFileSystem(storage, path, rel_prefix)
        self.fs = cast(Any, self._recording)
        self.path = path

    @property
    def records(self) -> dict[str, FileRecord]:
        """Relative path -> size and checksum of every file this rank wrote."""
        return self._recording.records

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """DCP's writer, with ``torch.save``'s per-record zip CRC-32 turned off meanwhile.

        The zip CRC costs about a third of the write time and checks nothing that the
        file's XXH3 checksum in the manifest does not; ``torch.load`` and ``dcp.load`` read
        such archives as usual. The switch is process-wide (``torch.serialization``), so a
        ``torch.save`` on another thread during this call also skips its CRC.
        """
        with zip_crc32_off():
            return super().write_data(plan, planner)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return True


def dcp_call(fn: Any, what: str, /, *args: Any, **kwargs: Any) -> Any:
    """Run a DCP collective, turning its ``CheckpointException`` (a ``BaseException``) into ours.

    The lowest failing rank's error is re-raised as is when it is a reckpt error, so a
    user mistake detected inside DCP reads the same on every rank; anything else becomes
    a :class:`DistributedCheckpointError` naming every failing rank.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    from reckpt.errors import CheckpointError, DistributedCheckpointError

    try:
        with warnings.catch_warnings():
            # reckpt passes no_dist=True deliberately when no process group exists.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            return fn(*args, **kwargs)
    except CheckpointException as e:
        failures = {rank: pair[0] for rank, pair in e.failures.items()}
        first = failures[min(failures)]
        if isinstance(first, CheckpointError):
            raise first from None
        detail = "; ".join(f"rank {r}: {_described(x)}" for r, x in sorted(failures.items()))
        raise DistributedCheckpointError(f"{what} failed: {detail}", failures) from None


def _described(error: BaseException) -> str:
    """``Type: message``, with the exception's notes (where a snapshot process raised it)."""
    notes = "".join(f" ({note})" for note in getattr(error, "__notes__", ()))
    return f"{type(error).__name__}: {error}{notes}"
