"""Parallel reads of local data files into their destinations, hashed in file order.

One sequential stream keeps a disk at the depth of the kernel's read-ahead window: a virtual
or network disk then waits one request's latency after another, and its speed swings with
that latency (a cold 1 GiB read took 0.6-2.2 s on the development VM). Several large reads
in flight hide it: four threads reading 16 MiB pieces with ``pread`` (``os.preadv``, which
releases the GIL and fills the destination's memory directly) read the same gigabyte at a
steady 0.7-0.9 s.

A verified restore also needs each file's XXH3, computed over the bytes in file order. The
pieces are handed out round-robin over the files (piece 0 of every file, then piece 1 ...),
so the threads read different files at once, and the thread that completes a piece hashes
it, and the pieces after it already read, if it is the next one its file's hash needs;
otherwise the thread that completes that earlier piece will. So each file is hashed in
order, different files at the same time, by the threads that read them, straight from the
destination right after the read (no copy, still in the cache): the hashing (about 0.1 s per
GB on one idle core) spreads over the cores and overlaps the I/O, and a busy CPU slows it
without idling the disk. Bytes a file holds that no destination wants (archive headers,
items read another way) are read into scratch buffers only when the file is hashed, at most
:data:`_AHEAD` per thread ahead of their file's hash, and dropped once hashed.

Where no thread can be started (Python 3.12.0-3.12.2 at interpreter exit) the pieces are
read and hashed in order on the caller's thread.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import xxhash

from reckpt.format.integrity import charge_hashing

__all__ = ["FileRead", "read_files", "READ_THREADS", "READ_PIECE"]

READ_THREADS = 4  # reads in flight: enough to hide a virtual disk's latency
READ_PIECE = 16 << 20  # one pread: large requests, few system calls
_AHEAD = 2  # scratch pieces per thread read beyond their file's hash (bounds their memory)


@dataclass
class FileRead:
    """One file to read: where its wanted bytes go, and whether every byte is hashed.

    Attributes:
        fd: an open descriptor of the file (the caller closes it).
        spans: ``(offset, destination)`` pairs, sorted by offset, not overlapping.
        hash_all: read and hash the whole file (bytes outside ``spans`` into scratch).
        size: the bytes read from the file (with ``hash_all``: all it holds, hashed), once read.
        checksum: the XXH3-64 of the whole file, once read with ``hash_all``.
        short: the file ended before a destination was filled (a truncated file).
    """

    fd: int
    spans: list[tuple[int, memoryview]]
    hash_all: bool = False
    size: int = 0
    checksum: str = ""
    short: bool = False
    _pieces: list[_Piece] = field(default_factory=list, repr=False)
    _hashed: int = 0  # pieces hashed so far (the next one to hash)
    _hashing: bool = False  # a thread is hashing this file now
    _hasher: Any = field(default=None, repr=False)


@dataclass
class _Piece:
    file: FileRead
    index: int  # within its file
    offset: int
    length: int
    dest: memoryview | None  # None: scratch, allocated by the reader and dropped after hashing
    got: int = 0
    data: memoryview | None = None
    ready: bool = False


def _plan(files: Sequence[FileRead], piece: int) -> list[_Piece]:
    """Every piece to read: each file's spans (and, when hashed, its gaps), round-robin."""
    for f in files:
        ranges: list[tuple[int, int, memoryview | None]] = []
        pos = 0
        for offset, dest in f.spans:
            if f.hash_all and offset > pos:
                ranges.append((pos, offset - pos, None))
            ranges.append((offset, len(dest), dest))
            pos = offset + len(dest)
        if f.hash_all:
            f._hasher = xxhash.xxh3_64()
            end = os.fstat(f.fd).st_size
            if end > pos:
                ranges.append((pos, end - pos, None))
        f._pieces = []
        for offset, length, target in ranges:
            for start in range(0, length, piece):
                n = min(piece, length - start)
                view = None if target is None else target[start : start + n]
                f._pieces.append(_Piece(f, len(f._pieces), offset + start, n, view))
    longest = max((len(f._pieces) for f in files), default=0)
    return [f._pieces[k] for k in range(longest) for f in files if k < len(f._pieces)]


class _Reading:
    """The pieces of one :func:`read_files` call and the threads reading and hashing them."""

    def __init__(self, files: Sequence[FileRead], piece: int, threads: int) -> None:
        self._order = _plan(files, piece)
        self._next = 0  # the next piece to hand out
        self._reading = 0  # pieces being read
        self._ahead = max(1, threads) * _AHEAD
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._threads = threads

    def run(self) -> None:
        """Read (and hash) every piece; raise the first failure once every thread stopped."""
        started: list[threading.Thread] = []
        for i in range(min(self._threads, len(self._order))):
            thread = threading.Thread(target=self._work, name=f"reckpt-read-{i}", daemon=True)
            try:
                thread.start()
            except RuntimeError:  # no new threads (interpreter shutdown): read inline
                break
            started.append(thread)
        if not started:
            self._work()
        for thread in started:
            thread.join()
        if self._error is not None:
            raise self._error

    def _take(self) -> _Piece | None:
        with self._cond:
            # A scratch piece waits for its file's hash to come near. The pieces of that file
            # before it are all handed out already, so their readers hash the file up to it.
            while (
                self._error is None
                and self._next < len(self._order)
                and (p := self._order[self._next]).dest is None
                and p.index - p.file._hashed >= self._ahead
            ):
                self._cond.wait()
            if self._error is not None or self._next >= len(self._order):
                return None
            p = self._order[self._next]
            self._next += 1
            self._reading += 1
            return p

    def _work(self) -> None:
        while (p := self._take()) is not None:
            try:
                _read(p)
            except BaseException as e:  # raised by run() on the caller's thread
                with self._cond:
                    self._reading -= 1
                    self._error = self._error or e
                    self._cond.notify_all()
                return
            with self._cond:
                self._reading -= 1
                p.ready = True
                f = p.file
                if f._hasher is None or f._hashing or f._pieces[f._hashed] is not p:
                    continue  # not hashed, or not this piece's turn: its turn comes later
                f._hashing = True
            self._hash_from(f)

    def _hash_from(self, f: FileRead) -> None:
        """Hash ``f``'s pieces in order while they are read; another thread takes over later."""
        while True:
            p = f._pieces[f._hashed]
            with self._cond:
                tail = self._next >= len(self._order) and self._reading == 0
            start = time.perf_counter()
            if p.data is not None:
                f._hasher.update(p.data)
            if tail:  # nothing is read meanwhile: this hashing is the checksums' own cost
                charge_hashing(time.perf_counter() - start)
            p.data = None  # a scratch buffer goes now
            with self._cond:
                f._hashed += 1
                self._cond.notify_all()
                if f._hashed >= len(f._pieces) or not f._pieces[f._hashed].ready:
                    f._hashing = False
                    return


def _read(p: _Piece) -> None:
    """Read one piece (several ``pread`` calls if the kernel returns fewer bytes)."""
    view = p.dest if p.dest is not None else memoryview(bytearray(p.length))
    while p.got < p.length:
        n = os.preadv(p.file.fd, [view[p.got :]], p.offset + p.got)
        if n <= 0:
            break
        p.got += n
    p.data = view[: p.got]


def read_files(files: Sequence[FileRead], threads: int = READ_THREADS, piece: int = READ_PIECE) -> None:
    """Fill every file's destinations; hash the files marked ``hash_all``.

    Sets each file's ``size``, ``checksum`` (hashed files) and ``short``. Destinations must
    not be touched by others until this returns.

    Args:
        files: the files to read.
        threads: reads in flight.
        piece: bytes per read.

    Raises:
        OSError: a read failed (after every reading thread stopped).
    """
    _Reading(files, piece, threads).run()
    for f in files:
        f.size = sum(p.got for p in f._pieces)
        f.short = any(p.got < p.length for p in f._pieces if p.dest is not None)
        if f._hasher is not None:
            f.checksum = str(f._hasher.hexdigest())
        f._pieces, f._hasher = [], None
