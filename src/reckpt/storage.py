"""One fsspec-backed storage layer for every read and write reckpt makes.

Paths are ``str`` rather than ``pathlib.Path`` because a checkpoint may live at a
URL (``s3://bucket/run``) that ``Path`` would mangle. Plain paths, ``file://``,
``memory://`` and ``s3://`` go through the same code; the only behavioural switch
is :attr:`Storage.atomic_rename`, which selects the commit strategy (rename of a
staging directory on POSIX filesystems, a manifest-last marker on object stores).

Storage options (endpoint, credentials) are passed explicitly or, for S3, taken
from the standard environment variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``) by botocore
itself. Nothing is monkey-patched.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Mapping
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs

from reckpt.errors import CheckpointNotFoundError, ConfigError

__all__ = ["Storage", "storage_for"]

_LOCAL_PROTOCOLS = {"file", "local"}


class Storage:
    """A filesystem plus the handful of primitives reckpt needs.

    Args:
        fs: the fsspec filesystem.
        local: whether the filesystem is the POSIX local one (fsync and atomic rename).

    Example:
        >>> st = storage_for("memory://demo")
        >>> st.write_bytes("memory://demo/a.txt", b"hi")
        >>> st.read_bytes("memory://demo/a.txt")
        b'hi'
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, local: bool) -> None:
        self.fs = fs
        self.local = local

    @property
    def atomic_rename(self) -> bool:
        """Whether renaming a directory is atomic (POSIX local filesystem only)."""
        return self.local

    # -- paths -------------------------------------------------------------------------
    @staticmethod
    def join(base: str, *parts: str) -> str:
        """Join path components with ``/`` (URLs keep their ``scheme://``)."""
        out = base.rstrip("/")
        for part in parts:
            out = f"{out}/{part.strip('/')}"
        return out

    @staticmethod
    def parent(path: str) -> str:
        """Parent of a path or URL (``s3://b/run/model.ckpt-1`` -> ``s3://b/run``)."""
        stripped = path.rstrip("/")
        head, sep, _ = stripped.rpartition("/")
        if not sep:
            return "."
        if head.endswith(":/"):  # "s3://bucket" has no parent inside the store
            return stripped
        return head or "/"

    # -- queries -----------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        return bool(self.fs.exists(path))

    def isdir(self, path: str) -> bool:
        return bool(self.fs.isdir(path))

    def isfile(self, path: str) -> bool:
        return bool(self.fs.isfile(path))

    def size(self, path: str) -> int:
        return int(self.fs.size(path))

    def ls(self, path: str) -> list[str]:
        """Sorted basenames of the entries of a directory ([] when it does not exist)."""
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        names = {str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries}
        own = path.rstrip("/").rsplit("/", 1)[-1]
        # Some object stores list a "directory" placeholder as its own child.
        if len(entries) == 1 and own in names and not self.isdir(self.join(path, own)):
            return []
        return sorted(names)

    def walk_files(self, path: str) -> list[str]:
        """Every file below ``path``, as ``/``-separated paths relative to it, sorted."""
        root = self.fs._strip_protocol(path).rstrip("/")
        out = []
        for full in self.fs.find(path):
            full = str(full)
            rel = full[len(root) :].lstrip("/") if full.startswith(root) else full
            out.append(rel)
        return sorted(out)

    # -- reads ---------------------------------------------------------------------------
    def open(self, path: str, mode: str = "rb") -> IO[Any]:
        if "w" in mode:
            self._ensure_parent(path)
        return self.fs.open(path, mode)  # type: ignore[no-any-return]

    def read_bytes(self, path: str) -> bytes:
        try:
            return bytes(self.fs.cat_file(path))
        except FileNotFoundError as e:
            raise CheckpointNotFoundError(f"{path}: file does not exist") from e

    def read_text(self, path: str) -> str:
        return self.read_bytes(path).decode("utf-8")

    # -- writes --------------------------------------------------------------------------
    def makedirs(self, path: str) -> None:
        self.fs.makedirs(path, exist_ok=True)

    def write_bytes(self, path: str, data: bytes, *, fsync: bool = True) -> None:
        """Write a whole file, creating parents (on local disk fsynced; one PUT on object stores)."""
        self._ensure_parent(path)
        with self.fs.open(path, "wb") as f:
            f.write(data)
            if fsync and self.local:
                f.flush()
                os.fsync(f.fileno())

    def write_bytes_atomic(self, path: str, data: bytes) -> None:
        """Replace a file so that readers see the old or the new content, never a mix.

        On POSIX: write a temporary sibling, fsync, rename over, fsync the directory.
        On object stores a single PUT is already atomic.
        """
        if not self.local:
            self.write_bytes(path, data)
            return
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            self.write_bytes(tmp, data)
            os.replace(self._local(tmp), self._local(path))
        except BaseException:
            with contextlib.suppress(OSError):
                self.fs.rm_file(tmp)
            raise
        self.fsync_dir(self.parent(path))

    def rename(self, src: str, dst: str) -> None:
        """Rename a file or directory (atomic only where :attr:`atomic_rename`)."""
        if self.local:
            os.rename(self._local(src), self._local(dst))
        elif self.isdir(src):
            # Object stores: copy every object, then delete the originals (not atomic).
            for rel in self.walk_files(src):
                self.fs.copy(self.join(src, rel), self.join(dst, rel))
            self.rm(src, recursive=True)
        else:
            self.fs.mv(src, dst)

    def rm(self, path: str, recursive: bool = False) -> None:
        """Remove a file or (with ``recursive``) a tree; a missing path is not an error."""
        try:
            if recursive:
                self.fs.rm(path, recursive=True)
            else:
                self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    def fsync_dir(self, path: str) -> None:
        """Make a directory's entries (a rename, a new file) durable; no-op off POSIX."""
        if not self.local:
            return
        fd = os.open(self._local(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _ensure_parent(self, path: str) -> None:
        # Object stores have no directories; local files need theirs.
        if self.local:
            os.makedirs(os.path.dirname(self._local(path)), exist_ok=True)

    def _local(self, path: str) -> str:
        return str(self.fs._strip_protocol(path))


def storage_for(path: str, storage_options: Mapping[str, Any] | None = None) -> Storage:
    """The :class:`Storage` for ``path``.

    Args:
        path: a local path or any fsspec URL (``file://``, ``memory://``, ``s3://`` ...).
        storage_options: keyword arguments for the fsspec filesystem, e.g.
            ``{"endpoint_url": "http://127.0.0.1:9000", "key": ..., "secret": ...}``.

    Raises:
        ConfigError: the URL's scheme is unknown or its backend is not installed.
    """
    if not isinstance(path, str) or not path:
        raise ConfigError(f"checkpoint path must be a non-empty str, got {path!r}")
    try:
        fs, _ = url_to_fs(path, **dict(storage_options or {}))
    except (ValueError, ImportError) as e:
        raise ConfigError(
            f"cannot open storage for {path!r}: {e}. Use a local path or a URL whose fsspec"
            " backend is installed (e.g. 's3://' needs the 's3fs' package)."
        ) from e
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    return Storage(fs, local=bool(set(protocols) & _LOCAL_PROTOCOLS))
