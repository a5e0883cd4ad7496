"""Promotion: copy a committed checkpoint to a slower tier, file by file, under the commit protocol.

The copy is an ordinary save as far as the target tier can tell: it goes through
:class:`reckpt.commit.protocol.SaveCommit` (a staging directory renamed into place on POSIX,
an in-progress marker and the manifest last on object stores), with the source's manifest,
byte for byte. So the copy commits only when complete, a crash leaves debris that the next
save or promotion cleans (never a checkpoint that looks committed), and doing it again is a
no-op: a target holding the same manifest is already the copy (:func:`same_checkpoint`).
Every byte is checked against the manifest's size and checksum while it streams, so a
damaged source never becomes a durable copy.

Two ways to write a tier:

- one writer (:func:`copy_checkpoint`): the whole checkpoint, or one node's part of it into a
  node-scoped tier;
- many writers (:func:`commit_shared` on the node holding rank 0, :func:`contribute_shared`
  on every other node): each node uploads the files of its own ranks into one staging area
  of a shared tier, named by the checkpoint (:func:`shared_token`), and the first node commits
  only once every file of the manifest has arrived.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable

from reckpt.commit.protocol import SaveCommit
from reckpt.commit.state import checkpoint_state, new_token, read_owner
from reckpt.errors import IntegrityError
from reckpt.format.integrity import HashingWriter, checksum_bytes, read_some
from reckpt.format.manifest import Manifest
from reckpt.naming import (
    DATALOADER_STATE_FILE,
    DCP_METADATA_FILE,
    IN_PROGRESS_MARKER,
    MANIFEST_FILE,
    META_FILE,
    OWNER_FILE,
    PLAN_FILE,
    basename,
    is_sidecar,
    staging_name,
)
from reckpt.ownership import manifest_members
from reckpt.storage.core import TMP_INFIX, Storage

__all__ = [
    "copy_checkpoint",
    "commit_shared",
    "contribute_shared",
    "copy_file",
    "is_shared_file",
    "present_files",
    "same_checkpoint",
    "shared_token",
]

logger = logging.getLogger(__name__)

_PIECE = 16 << 20


def is_shared_file(rel: str) -> bool:
    """Whether rank 0 writes the file for every rank (``plan``, ``meta``, the DCP metadata ...).

    Every node's part of a checkpoint holds these; the other files belong to one rank each.

    Examples:
        >>> is_shared_file("model/.metadata"), is_shared_file("model/__1_0.distcp")
        (True, False)
    """
    return rel in (PLAN_FILE, META_FILE, DATALOADER_STATE_FILE) or basename(rel) == DCP_METADATA_FILE


def same_checkpoint(storage: Storage, path: str, manifest_bytes: bytes) -> bool:
    """Whether ``path`` is committed with exactly this manifest (the copy is already done)."""
    if checkpoint_state(storage, path) != "committed":
        return False
    try:
        return storage.read_bytes(Storage.join(path, MANIFEST_FILE)) == manifest_bytes
    except OSError:
        return False


def present_files(storage: Storage, path: str, manifest: Manifest) -> tuple[list[str], list[str]]:
    """``(manifest files present at path, sidecars present)``, sorted."""
    found = set(storage.walk_files(path))
    files = sorted(rel for rel in manifest.files if rel in found)
    sidecars = sorted(rel for rel in found if "/" not in rel and is_sidecar(rel))
    return files, sidecars


def copy_file(src: Storage, src_path: str, dst: Storage, dst_path: str, size: int, checksum: str) -> int:
    """Copy one file, checking it against ``size`` and ``checksum`` as it streams; returns its size.

    On local disk the copy is fsynced. A mismatch removes the copy.

    Raises:
        IntegrityError: the source differs from its record (it is damaged).
    """
    got: list[tuple[int, str]] = []
    with src.open(src_path, "rb") as fin:
        out = HashingWriter(dst.open(dst_path, "wb"), lambda n, c: got.append((n, c)), writeback=dst.local)
        try:
            buf = memoryview(bytearray(min(_PIECE, max(size, 1))))
            while n := read_some(fin, buf):
                out.write(buf[:n])
            if dst.local:
                os.fsync(out.fileno())
        except BaseException:
            with contextlib.suppress(Exception):
                out.close()
            with contextlib.suppress(OSError):
                dst.rm(dst_path)
            raise
        out.close()
    n, c = got[0]
    if n != size or c != checksum:
        dst.rm(dst_path)
        raise IntegrityError(
            f"{src_path}: {n} bytes with checksum {c}, the manifest says {size} bytes with {checksum};"
            " the source is damaged and is not copied"
        )
    return n


def _copy_all(
    src: Storage, src_path: str, manifest: Manifest, files: Iterable[str], dst: Storage, work: str
) -> int:
    total = 0
    for rel in files:
        rec = manifest.files[rel]
        total += copy_file(
            src, Storage.join(src_path, rel), dst, Storage.join(work, rel), rec.size, rec.checksum
        )
    return total


def _copy_sidecars(src: Storage, src_path: str, sidecars: Iterable[str], dst: Storage, work: str) -> None:
    """Sidecars (metrics, timings) travel as they are: they carry their own checksums."""
    for rel in sidecars:
        with contextlib.suppress(OSError):  # replaced under us: the next promotion takes it
            dst.write_bytes(Storage.join(work, rel), src.read_bytes(Storage.join(src_path, rel)))


def copy_checkpoint(
    src: Storage,
    src_path: str,
    manifest_bytes: bytes,
    dst: Storage,
    dst_path: str,
    *,
    complete: bool = True,
) -> int | None:
    """One writer: make ``dst_path`` a committed copy of the checkpoint at ``src_path``.

    Args:
        src, src_path: the committed source.
        manifest_bytes: the source's manifest, as read (the copy's manifest, byte for byte).
        dst, dst_path: the target checkpoint directory on the slower tier.
        complete: every file of the manifest must be present at the source; ``False`` copies
            one node's part (the files present).

    Returns:
        The bytes copied, ``None`` when ``dst_path`` already held this checkpoint.

    Raises:
        IntegrityError: a source file is missing (with ``complete``) or damaged.
    """
    if same_checkpoint(dst, dst_path, manifest_bytes):
        return None
    manifest = Manifest.from_json(manifest_bytes, Storage.join(src_path, MANIFEST_FILE))
    files, sidecars = present_files(src, src_path, manifest)
    missing = sorted(set(manifest.files) - set(files))
    if complete and missing:
        raise IntegrityError(
            f"{src_path}: {len(missing)} file(s) of the manifest are missing, e.g. {missing[0]}"
        )
    start = time.monotonic()
    with SaveCommit(dst, dst_path, new_token(), manifest_members(manifest.files)) as commit:
        work = commit.prepare(lambda: True)
        try:
            total = _copy_all(src, src_path, manifest, files, dst, work)
            _copy_sidecars(src, src_path, sidecars, dst, work)
            commit.commit(manifest_bytes)
        except BaseException:
            commit.abort()
            raise
    logger.info("promoted %s -> %s: %d bytes in %.2fs", src_path, dst_path, total, time.monotonic() - start)
    return total


def shared_token(dst_path: str, manifest_bytes: bytes) -> str:
    """The staging token every node derives for one checkpoint on a shared tier (hex).

    Example:
        >>> len(shared_token("s3://b/run/model.ckpt-5", b"{}"))
        16
    """
    return checksum_bytes(dst_path.encode("utf-8") + b"\n" + manifest_bytes)


def _shared_work(dst: Storage, dst_path: str, token: str) -> tuple[str, str]:
    """``(work directory, owner record)`` of a shared promotion (as :class:`SaveCommit` makes them)."""
    if dst.atomic_rename:
        work = Storage.join(Storage.parent(dst_path), staging_name(token))
        return work, Storage.join(work, OWNER_FILE)
    return dst_path, Storage.join(dst_path, IN_PROGRESS_MARKER)


def commit_shared(
    src: Storage,
    src_path: str,
    manifest_bytes: bytes,
    dst: Storage,
    dst_path: str,
    *,
    timeout_s: float,
    poll_s: float = 0.2,
    on_wait: Callable[[], None] = lambda: None,
) -> int | None:
    """The node of rank 0: open the shared staging area, upload its part, commit when all arrived.

    The other nodes upload theirs (:func:`contribute_shared`) once the area is open. The
    commit waits until every file of the manifest is present with its size.

    Returns:
        The bytes this node copied, ``None`` when ``dst_path`` already held this checkpoint.

    Raises:
        TimeoutError: the other nodes' files did not all arrive within ``timeout_s`` (the
            staging area is removed; a later attempt starts again).
    """
    if same_checkpoint(dst, dst_path, manifest_bytes):
        return None
    manifest = Manifest.from_json(manifest_bytes, Storage.join(src_path, MANIFEST_FILE))
    files, sidecars = present_files(src, src_path, manifest)
    token = shared_token(dst_path, manifest_bytes)
    deadline = time.monotonic() + timeout_s
    with SaveCommit(dst, dst_path, token, manifest_members(manifest.files)) as commit:
        work = commit.prepare(lambda: True)
        try:
            total = _copy_all(src, src_path, manifest, files, dst, work)
            _copy_sidecars(src, src_path, sidecars, dst, work)
            while missing := _missing(dst, work, manifest):
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{dst_path}: {len(missing)} file(s) of other nodes did not arrive within"
                        f" {timeout_s:.0f}s, e.g. {missing[0]}"
                    )
                on_wait()
                time.sleep(poll_s)
            commit.commit(manifest_bytes)
        except BaseException:
            commit.abort()
            raise
    logger.info("committed shared %s (this node copied %d bytes)", dst_path, total)
    return total


def _missing(dst: Storage, work: str, manifest: Manifest) -> list[str]:
    found = set(dst.walk_files(work))
    missing = sorted(rel for rel in manifest.files if rel not in found)
    if missing:
        return missing
    wrong = [rel for rel, rec in manifest.files.items() if dst.size(Storage.join(work, rel)) != rec.size]
    return sorted(wrong)


def contribute_shared(
    src: Storage,
    src_path: str,
    manifest_bytes: bytes,
    dst: Storage,
    dst_path: str,
    *,
    timeout_s: float,
    poll_s: float = 0.2,
) -> int | None:
    """Every node but rank 0's: upload this node's own files into the shared staging area.

    Waits until the node of rank 0 has opened the area (its owner record carries
    :func:`shared_token`), uploads each file of its ranks not yet there (each appears whole:
    a temporary name renamed on POSIX, one object on a store), and returns once the checkpoint
    is committed. An area removed and opened again (the other node restarted) gets the files
    again.

    Returns:
        The bytes uploaded, ``None`` when the checkpoint was committed without them.

    Raises:
        TimeoutError: the checkpoint was not committed within ``timeout_s``.
    """
    manifest = Manifest.from_json(manifest_bytes, Storage.join(src_path, MANIFEST_FILE))
    files, _ = present_files(src, src_path, manifest)
    mine = [rel for rel in files if not is_shared_file(rel)]
    token = shared_token(dst_path, manifest_bytes)
    work, record = _shared_work(dst, dst_path, token)
    deadline = time.monotonic() + timeout_s
    total: int | None = None
    while not same_checkpoint(dst, dst_path, manifest_bytes):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{dst_path}: not committed within {timeout_s:.0f}s of this node's upload")
        owner = read_owner(dst, record)
        if owner is not None and owner.token == token:
            found = set(dst.walk_files(work))
            for rel in mine:
                if rel not in found:
                    total = (total or 0) + _upload(src, src_path, manifest, rel, dst, work)
        time.sleep(poll_s)
    return total


def _upload(src: Storage, src_path: str, manifest: Manifest, rel: str, dst: Storage, work: str) -> int:
    """One file into a shared area so that it appears only whole."""
    rec = manifest.files[rel]
    final = Storage.join(work, rel)
    if not dst.atomic_rename:
        return copy_file(src, Storage.join(src_path, rel), dst, final, rec.size, rec.checksum)
    tmp = f"{final}{TMP_INFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    n = copy_file(src, Storage.join(src_path, rel), dst, tmp, rec.size, rec.checksum)
    dst.rename(tmp, final)
    return n
