"""Writing one rank's shard of a dynamic table: every file at once, straight from memory.

A shard is six or seven files (:mod:`reckpt.dynamic.dump` has the layout). Every file is
opened through the storage layer (:meth:`Storage.open <reckpt.storage.core.Storage.open>`)
and written from the arrays' own memory (no ``tobytes`` copies) in pieces of up to 16 MiB,
each hashed (XXH3, the manifest's checksum) from the same buffer, and fsynced once, when all
its bytes are written:

- on a local disk (:class:`fsspec.implementations.local.LocalFileSystem`) the pieces of all
  files go to a pool of :data:`WRITERS` threads that ``pwrite`` them at their offsets, so
  several streams reach the disk at once, even within one file (a single stream wrote at
  half the rate of four on the machines measured); a full dump's files use direct I/O
  (:mod:`reckpt.dynamic.directio`: no page-cache copy, which cost as much CPU as the rest of
  the dump), other files start each piece's writeback at once; one more thread hashes each
  file's pieces in order;
- elsewhere (object stores, wrapped filesystems) each file is a stream of its own, written
  in order by a thread of its own through a :class:`~reckpt.format.integrity.HashingWriter`.

A shard comes from a :class:`~reckpt.dynamic.snapshot.Snapshot` (all rows, or the touched
ones): the sorted keys are written from the snapshot's own array as they are sorted, and the
rows, in key order, are gathered chunk by chunk (by two threads:
:func:`~reckpt.dynamic.snapshot.find_gather`) into a few staging buffers, kept by the table
from dump to dump, while the previous chunks are being written, so the sort, the gather,
the checksums and the disk overlap.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import xxhash

from reckpt.dynamic.directio import aligned, local_fs, pwrite_all, pwrite_padded, set_direct
from reckpt.dynamic.snapshot import Part, Snapshot
from reckpt.format.integrity import FileRecord, HashingWriter
from reckpt.storage.core import Storage
from reckpt.storage.errors import storage_error
from reckpt.storage.hooks import storage_op
from reckpt.storage.writeback import start_writeback

__all__ = ["CHUNK_BYTES", "WRITERS", "file_bytes", "write_shard"]

CHUNK_BYTES = 16 << 20
"""Bytes of embedding rows gathered per chunk: one write (and one writeback request) each."""
WRITERS = 4
"""Threads writing a local shard's pieces (4 parallel streams wrote fastest on the machines measured)."""
_STAGES = WRITERS + 2  # chunks being written, one being gathered, one spare
_MIN_CHUNKS = 8  # a dump of few rows (a delta) still goes in this many chunks, to overlap

Done = Callable[[], None]


def file_bytes(arr: np.ndarray) -> memoryview:
    """The bytes of ``arr`` as a file holds them (little-endian, C order), without a copy where possible."""
    a = np.ascontiguousarray(arr)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and sys.byteorder == "big"):
        a = a.astype(a.dtype.newbyteorder("<"))
    return a.reshape(-1).view(np.uint8).data


def _latch(n: int, then: Done | None) -> Done:
    """A callback that calls ``then`` on its ``n``-th call."""
    left = [n]
    lock = threading.Lock()

    def hit() -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last and then is not None:
            then()

    return hit


class _Workers:
    """Threads running queued jobs in order of arrival; a job's failure goes to its ``fail``."""

    def __init__(self, n: int, name: str) -> None:
        self.jobs: queue.SimpleQueue[tuple[Callable[[], None], Callable[[BaseException], None], Done] | None]
        self.jobs = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []
        for _ in range(n):
            t = threading.Thread(target=self._run, name=name, daemon=True)
            try:
                t.start()
            except RuntimeError:  # no new threads at interpreter shutdown: run jobs inline
                break
            self.threads.append(t)

    def submit(self, job: Callable[[], None], fail: Callable[[BaseException], None], done: Done) -> None:
        if not self.threads:
            self._one(job, fail, done)
        else:
            self.jobs.put((job, fail, done))

    @staticmethod
    def _one(job: Callable[[], None], fail: Callable[[BaseException], None], done: Done) -> None:
        try:
            job()
        except BaseException as e:  # raised on the caller's thread by the file's finish()
            fail(e)
        finally:
            done()

    def _run(self) -> None:
        while (task := self.jobs.get()) is not None:
            self._one(*task)

    def close(self) -> None:
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join()
        self.threads = []


class _Out:
    """One file being written; its pieces go out in the order they are put (see the module docstring)."""

    def __init__(
        self, storage: Storage, work: str, rel: str, pool: _Workers | None, hasher: _Workers
    ) -> None:
        self.rel, self.path = rel, Storage.join(work, rel)
        self.record: FileRecord | None = None
        self.error: BaseException | None = None
        self._pool, self._hasher = pool, hasher
        self._size = 0
        self._pending = 0
        self._idle = threading.Condition()
        raw = storage.open(self.path, "wb")
        if pool is not None:  # local: pwrite at offsets from the pool, hashed here
            self._raw: Any = raw
            self._fd = raw.fileno()
            self._hash: Any = xxhash.xxh3_64()
            self.stream: HashingWriter | None = None
            self._direct = set_direct(self._fd, True)
            self._padded = False
        else:  # a stream of its own, in order, on a thread of its own
            self.stream = HashingWriter(raw, self._closed, writeback=storage.local)
            self._raw = None
            self._own = _Workers(1, "reckpt-dyn-write")

    def _closed(self, size: int, checksum: str) -> None:
        self.record = FileRecord(self.rel, size, checksum)

    def _fail(self, e: BaseException) -> None:
        if self.error is None:
            self.error = e

    def put(self, view: memoryview, done: Done | None = None) -> None:
        """Write ``view`` after what was put before; ``done()`` once it is written and hashed (or failed)."""
        if self.error is not None:
            raise self.error
        with self._idle:
            self._pending += 1

        def settled() -> None:
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()
            if done is not None:
                done()

        if self.stream is not None:
            stream = self.stream
            self._own.submit(lambda: self._stream_write(stream, view), self._fail, settled)
            return
        offset = self._size
        self._size += len(view)
        both = _latch(2, settled)
        assert self._pool is not None
        self._pool.submit(lambda: self._pwrite(offset, view), self._fail, both)
        self._hasher.submit(lambda: self._hash.update(view), self._fail, both)

    def _stream_write(self, stream: HashingWriter, view: memoryview) -> None:
        if self.error is None:
            stream.write(view)

    def _pwrite(self, offset: int, view: memoryview) -> None:
        if self.error is not None or not len(view):
            return
        if self._direct and not aligned(view, offset):
            self._direct = set_direct(self._fd, False) and False  # unaligned: the page cache from here
        try:
            if self._direct:
                self._padded = pwrite_padded(self._fd, view, offset) or self._padded
            else:
                pwrite_all(self._fd, view, offset)
                start_writeback(self._fd, offset, len(view))
        except OSError as e:
            raise storage_error(e, "write", self.path, 1) from e

    def finish(self) -> None:
        """Wait until everything put is written and hashed; raise the first failure."""
        with self._idle:
            while self._pending:
                self._idle.wait()
        if self.stream is not None:
            self._own.close()
        if self.error is not None:
            raise self.error

    def sync_close(self, storage: Storage) -> FileRecord:
        """fsync (local disks) and close; the file's manifest record."""
        if self.stream is not None:
            if storage.local:
                self.stream.flush()
                storage_op("fsync", self.path)
                os.fsync(self.stream.fileno())
            self.stream.close()
        else:
            storage_op("fsync", self.path)
            try:
                if self._padded:
                    os.ftruncate(self._fd, self._size)
                os.fsync(self._fd)
            except OSError as e:
                raise storage_error(e, "fsync", self.path, 1) from e
            self._raw.close()
            self.record = FileRecord(self.rel, self._size, str(self._hash.hexdigest()))
        if self.record is None:  # pragma: no cover - HashingWriter reports on close
            raise RuntimeError(f"{self.path}: closed without a size and checksum")
        return self.record

    def abort(self) -> None:
        """Wait for what is in flight and close, quietly (the caller raises its own error)."""
        with contextlib.suppress(BaseException):
            self.finish()
        with contextlib.suppress(BaseException):
            (self.stream if self.stream is not None else self._raw).close()


def _give_back(free: queue.SimpleQueue[dict[str, np.ndarray]], bufs: dict[str, np.ndarray]) -> Done:
    return lambda: free.put(bufs)


def _stream_part(snap: Snapshot, part: Part, key_out: _Out, outs: dict[str, _Out]) -> None:
    """The part's sorted keys and its columns, in key order, into their files.

    Every piece but a file's last starts and ends on a block boundary (direct I/O,
    :mod:`reckpt.dynamic.directio`): keys go out in pieces of :data:`CHUNK_BYTES` as soon as
    they are sorted, rows in chunks of a multiple of 1024 rows.
    """
    with snap.lock:
        part.order()
    n = part.n
    names = list(outs)
    row_bytes = max((part.shapes[k][1].itemsize * int(np.prod(part.shapes[k][0])) for k in names), default=8)
    rows = max(1024, CHUNK_BYTES // max(1, row_bytes) // 1024 * 1024)
    rows = min(rows, max(1024, -(-n // _MIN_CHUNKS) // 1024 * 1024))  # small dumps: chunks still overlap
    free: queue.SimpleQueue[dict[str, np.ndarray]] = queue.SimpleQueue()
    stages = min(_STAGES, -(-n // rows) + 1) if names and n else 0
    shapes = {k: part.shapes[k] for k in names}
    for _ in range(stages):
        free.put(snap.staging.take(shapes, min(rows, n)))
    per = CHUNK_BYTES // 8
    written = 0  # keys put so far

    def put_keys(upto: int) -> None:
        nonlocal written
        keys = part.sorted_until(upto)
        while written < upto:
            end = min(written + per, upto)
            key_out.put(file_bytes(keys[written:end]))
            written = end

    for start in range(0, n, rows):
        stop = min(start + rows, n)
        part.sorted_until(stop)
        put_keys(max(stop, part.frontier()) // per * per)
        if not names:
            continue
        bufs = free.get()
        with snap.lock:
            part.gather(start, stop, bufs)
        back = _latch(len(names), _give_back(free, bufs))
        for name in names:
            outs[name].put(file_bytes(bufs[name][: stop - start]), back)
    put_keys(n)
    for name in names:
        outs[name].finish()  # every chunk written: the buffers may go
    for _ in range(stages):
        snap.staging.give(free.get(), _STAGES)


def write_shard(storage: Storage, work: str, files: dict[str, str], src: Snapshot) -> dict[str, FileRecord]:
    """Write one shard's files (kind -> path relative to ``work``, in manifest order); their records.

    ``src``: a snapshot of all rows, or of the touched ones (then ``files`` names the
    removed keys too). Files are opened in the given order, written in parallel, then fsynced
    and closed in the given order.
    """
    local = local_fs(storage)
    pool = _Workers(WRITERS, "reckpt-dyn-write") if local else None
    hasher = _Workers(1, "reckpt-dyn-hash")
    outs: dict[str, _Out] = {}
    try:
        for kind, rel in files.items():
            outs[kind] = _Out(storage, work, rel, pool, hasher)
        rows = {"values": outs["emb_values"], "scores": outs["emb_scores"], "opt": outs["emb_opt_values"]}
        _stream_part(src, src.rows, outs["emb_keys"], rows)
        _stream_part(src, src.counts, outs["counter_keys"], {"freq": outs["counter_frequencies"]})
        if "removed_keys" in outs:
            removed = src.removed if src.removed is not None else np.empty(0, np.int64)
            outs["removed_keys"].put(file_bytes(removed))
        for out in outs.values():
            out.finish()
        return {out.rel: out.sync_close(storage) for out in outs.values()}
    except BaseException:
        for out in outs.values():
            out.abort()
        raise
    finally:
        if pool is not None:
            pool.close()
        hasher.close()
