"""Writing one rank's delta rows file with one copy of the touched rows, into reused buffers.

:mod:`reckpt.delta.rows` defines the file format and selects the rows
(:class:`~reckpt.delta.rows.RowSource`: the touched rows of one piece, not yet copied);
:class:`DeltaRows` writes a rank's sources as ``delta_rows/rank_<R>.bin`` and ``.json``, byte
for byte what :func:`reckpt.delta.rows.encode_pieces` would make, without building either in
memory:

- the index is computed from the sources' sizes alone, before any row is copied;
- each row is copied once, straight into a buffer that is handed to the file as it is (no
  ``tobytes``, no joined buffer; see :meth:`~reckpt.delta.rows.RowSource.gather`);
- synchronous saves fill a few staging buffers of :data:`STAGE_BYTES` in turn with the
  file's bytes (the ids, then the rows gathered in place, piece after piece) while a writer
  thread writes the full ones, so the file is written while the next rows (the next table)
  are gathered; checksums are computed on the way
  (:class:`reckpt.format.integrity.HashingWriter`, which also starts the disk's writeback
  of every piece);
- asynchronous saves :meth:`DeltaRows.freeze` the rows while the caller waits (the same
  layout, gathered into one arena), and the file is written from the arena in the background.

The staging buffers and the arena are a :class:`RowBuffers` that the row tracker keeps, so a
run's deltas reuse the same memory: no page faults on fresh allocations at each save.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import threading
from collections.abc import Callable

import torch

from reckpt.delta.rows import RowSource, bytes_view
from reckpt.format.integrity import FileRecord, HashingWriter
from reckpt.format.records import write_record
from reckpt.storage.core import Storage
from reckpt.storage.hooks import storage_op

__all__ = ["STAGE_BYTES", "DeltaRows", "RowBuffers"]

STAGE_BYTES = 8 << 20
"""Bytes of one staging buffer of a streamed write. Each full buffer is one hand-over to the
writer thread (and one to the checksum thread): small buffers overlap more of the gather with
the write, but every hand-over is a thread wake-up, which costs milliseconds on busy cores.
At 1M rows x 64 dims and 5% touched (55 MB), on the shared 2-CPU VM, 8 MiB beat 2 and 4 MiB
clearly and 16 MiB by a little (``benchmarks/delta.py``'s row files, measured apart)."""
_STAGES = 3  # one being written, one being gathered, one spare
_ALIGN = 64  # where a new run starts in the arena


class RowBuffers:
    """Host memory reused by every delta of one row tracker.

    ``staging``: a few buffers of :data:`STAGE_BYTES` that a streamed write cycles through.
    ``arena``: one buffer holding the rows file of a frozen (asynchronous) delta; it grows to
    the largest delta seen and is then refilled in place. A frozen delta's rows live in the arena
    until it is written: the next freeze must come after that save finished (the manager
    waits for the save in flight before it starts the next).
    """

    def __init__(self, stage_bytes: int = STAGE_BYTES) -> None:
        self.stage_bytes = stage_bytes
        self._staging: list[torch.Tensor] = []
        self._arena = torch.empty(0, dtype=torch.uint8)

    def staging(self, min_bytes: int) -> list[torch.Tensor]:
        """The staging buffers, each of at least ``min_bytes`` (allocated on first use)."""
        size = max(self.stage_bytes, min_bytes)
        if not self._staging or self._staging[0].numel() < size:
            self._staging = [torch.empty(size, dtype=torch.uint8) for _ in range(_STAGES)]
        return self._staging

    def arena(self, nbytes: int) -> torch.Tensor:
        """A buffer of at least ``nbytes``: the previous one when large enough."""
        if self._arena.numel() < nbytes:
            self._arena = torch.empty(nbytes + nbytes // 8, dtype=torch.uint8)
        return self._arena

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return int(self._arena.numel()) + sum(int(b.numel()) for b in self._staging)

    def release(self) -> None:
        """Drop the memory (it is allocated again when needed)."""
        self._staging = []
        self._arena = torch.empty(0, dtype=torch.uint8)


class DeltaRows:
    """One rank's delta rows: the sources in file order, and how to write their two files.

    Args:
        sources: the pieces, in the order of the file.
        buffers: the reused memory (the row tracker's).
    """

    def __init__(self, sources: list[RowSource], buffers: RowBuffers) -> None:
        self.sources = sources
        self.buffers = buffers
        self._runs: list[torch.Tensor] | None = None  # the file's bytes, once frozen
        entries, offset = [], 0
        for s in sources:
            entries.append(s.entry(offset))
            offset += 8 * s.count + s.values_nbytes
        self.index = json.dumps({"entries": entries}).encode("utf-8")
        self.nbytes = offset

    def freeze(self) -> None:
        """Copy every touched row now (into the arena), so the tensors may change afterwards.

        The arena holds the file's bytes in order (ids included); a piece whose rows would
        start misaligned for their dtype starts a new run at the next aligned offset instead.
        """
        arena = self.buffers.arena(self.nbytes + _ALIGN * (2 * len(self.sources) + 2))
        runs: list[torch.Tensor] = []
        at = [0]

        def fresh() -> torch.Tensor:
            return arena[at[0] :]

        def full(buf: torch.Tensor, n: int) -> None:
            runs.append(buf[:n])
            at[0] += -(-n // _ALIGN) * _ALIGN

        packer = _Packer(fresh, full)
        for s in self.sources:
            packer.put_bytes(bytes_view(s.ids))
            packer.put_rows(s)
        packer.close()
        self._runs = runs

    @property
    def frozen(self) -> bool:
        """Whether :meth:`freeze` copied the rows (the write then comes from the arena)."""
        return self._runs is not None

    def write(self, storage: Storage, work: str, stem: str) -> dict[str, FileRecord]:
        """Write ``<stem>.bin`` and ``<stem>.json`` into ``work``; their manifest records."""
        rel = f"{stem}.bin"
        out = {rel: self._write_data(storage, Storage.join(work, rel), rel)}
        out[f"{stem}.json"] = write_record(storage, work, f"{stem}.json", self.index)
        return out

    def _write_data(self, storage: Storage, path: str, rel: str) -> FileRecord:
        records: list[FileRecord] = []

        def on_close(size: int, checksum: str) -> None:
            records.append(FileRecord(rel, size, checksum))

        stream = HashingWriter(storage.open(path, "wb"), on_close, writeback=storage.local)
        try:
            if self._runs is not None:
                for run in self._runs:
                    stream.write(bytes_view(run))
            else:
                self._stream(stream)
            if storage.local:
                stream.flush()
                storage_op("fsync", path)
                os.fsync(stream.fileno())
        except BaseException:
            with contextlib.suppress(Exception):  # the write's own error is the one to report
                stream.close()
            raise
        stream.close()
        if records[0].size != self.nbytes:  # pragma: no cover - the index and the data disagree
            raise AssertionError(f"{path}: wrote {records[0].size} bytes, the index says {self.nbytes}")
        return records[0]

    def _stream(self, stream: HashingWriter) -> None:
        """Fill the staging buffers in turn while a writer thread writes the full ones."""
        free: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()
        for buf in self.buffers.staging(max((s.row_bytes for s in self.sources), default=0)):
            free.put(buf)
        pipe = _WriterThread(stream)

        def full(buf: torch.Tensor, n: int) -> None:
            if n:
                pipe.put(bytes_view(buf[:n]), functools.partial(free.put, buf))
            else:
                free.put(buf)

        packer = _Packer(free.get, full)
        try:
            for s in self.sources:
                packer.put_bytes(bytes_view(s.ids))
                packer.put_rows(s)
            packer.close()
        except BaseException:
            with contextlib.suppress(BaseException):  # the gather's own error is the one to report
                pipe.close()
            raise
        pipe.close()


class _Packer:
    """Lays a rows file out in host buffers, in file order: each row is copied straight to its
    place in the file's bytes.

    ``fresh()`` gives the buffer to fill next; ``full(buffer, n)`` receives one whose first
    ``n`` bytes are the file's next bytes. A buffer is full when the next row no longer fits,
    or when the next rows would start misaligned for their dtype (torch views need aligned
    offsets); a buffer with room never holds less than a whole row.
    """

    def __init__(self, fresh: Callable[[], torch.Tensor], full: Callable[[torch.Tensor, int], None]) -> None:
        self._fresh, self._full = fresh, full
        self._buf: torch.Tensor | None = None
        self._bytes = memoryview(b"")
        self._pos = 0

    def _room(self, need: int, align: int) -> torch.Tensor:
        """The current buffer, with ``need`` bytes free at an offset aligned to ``align``."""
        if self._buf is not None and (self._pos % align or self._buf.numel() - self._pos < need):
            self.close()
        if self._buf is None:
            self._buf = self._fresh()
            self._bytes = bytes_view(self._buf)
            self._pos = 0
        return self._buf

    def put_bytes(self, data: memoryview) -> None:
        done = 0
        while done < len(data):
            buf = self._room(1, 1)
            n = min(int(buf.numel()) - self._pos, len(data) - done)
            self._bytes[self._pos : self._pos + n] = data[done : done + n]
            self._pos += n
            done += n

    def put_rows(self, s: RowSource) -> None:
        """The piece's rows as the file holds them (raw: gathered in place)."""
        if s.row_bytes == 0:
            return
        if s.encoding != "raw":  # gathered aside, encoded, then copied in
            per = max(1, STAGE_BYTES // s.row_bytes)
            for start in range(0, s.count, per):
                stop = min(start + per, s.count)
                rows = s.gather(start, stop, torch.empty((stop - start) * s.row_bytes, dtype=torch.uint8))
                self.put_bytes(s.encoded(rows))
            return
        start = 0
        while start < s.count:
            buf = self._room(s.row_bytes, s.local.element_size())
            n = min(s.count - start, (int(buf.numel()) - self._pos) // s.row_bytes)
            s.gather(start, start + n, buf[self._pos :])
            self._pos += n * s.row_bytes
            start += n

    def close(self) -> None:
        """Hand over the current buffer (if any)."""
        if self._buf is not None:
            buf, n = self._buf, self._pos
            self._buf, self._pos, self._bytes = None, 0, memoryview(b"")
            self._full(buf, n)


class _WriterThread:
    """Writes views to a stream in order on one thread while the caller prepares the next.

    ``put(view, done)``: ``done`` runs once the view is written (the caller's buffer is free
    again), also after a failure. :meth:`close` waits for every view and raises the first
    failure. Where no thread can start (an interpreter shutting down), views are written
    inline.
    """

    def __init__(self, stream: HashingWriter) -> None:
        self._stream = stream
        self._tasks: queue.SimpleQueue[tuple[memoryview, Callable[[], None] | None] | None] = (
            queue.SimpleQueue()
        )
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = threading.Thread(
            target=self._run, name="reckpt-delta-rows", daemon=True
        )
        try:
            self._thread.start()
        except RuntimeError:  # "can't create new thread at interpreter shutdown"
            self._thread = None

    def put(self, view: memoryview, done: Callable[[], None] | None) -> None:
        if self._error is not None:
            raise self._error
        if self._thread is None:
            try:
                self._stream.write(view)
            finally:
                if done is not None:
                    done()
            return
        self._tasks.put((view, done))

    def _run(self) -> None:
        while (task := self._tasks.get()) is not None:
            view, done = task
            try:
                if self._error is None:
                    self._stream.write(view)
            except BaseException as e:  # handed to the caller by put() and close()
                self._error = e
            finally:
                if done is not None:
                    done()

    def close(self) -> None:
        if self._thread is not None:
            self._tasks.put(None)
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error
