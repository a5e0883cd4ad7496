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

**Failures.** Whole-file operations (reads, listings, ``write_bytes``, deletes, mkdir,
opening a file) are retried on transient errors (:func:`is_transient`) under
:data:`RETRY`: at most 4 attempts, backoff 50 ms doubling to 1 s, about 0.35 s in all.
A write into an open stream is retried only on ``EAGAIN`` (nothing was written); any other
failure of a half-written stream fails its save, which is rolled back. An
error that persists (or is not transient: a full disk, a read-only location, a denied
permission) is raised as :class:`StorageError`, which names the path, the operation and
what to do. Every mutating operation is counted by :func:`reckpt.storage.hooks.storage_op` (the
crash-injection knob).
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Mapping
from typing import IO, Any, TypeVar

import fsspec
from fsspec.core import url_to_fs

from reckpt.errors import CheckpointNotFoundError, ConfigError
from reckpt.storage.errors import RETRY, GuardedFile, RetryPolicy, StorageError, is_transient, storage_error
from reckpt.storage.hooks import storage_op

__all__ = ["Storage", "StorageError", "RetryPolicy", "RETRY", "is_transient", "storage_for"]

_LOCAL_PROTOCOLS = {"file", "local"}
_UNCACHED_PROTOCOLS = {"file", "local", "memory", "faulty"}  # no listings cache to turn off
_T = TypeVar("_T")


class Storage:
    """A filesystem plus the handful of primitives reckpt needs.

    Args:
        fs: the fsspec filesystem.
        local: whether the filesystem is the POSIX local one (fsync and atomic rename).
        retry: the retry policy of transient errors.

    Example:
        >>> st = storage_for("memory://demo")
        >>> st.write_bytes("memory://demo/a.txt", b"hi")
        >>> st.read_bytes("memory://demo/a.txt")
        b'hi'
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, local: bool, retry: RetryPolicy = RETRY) -> None:
        self.fs = fs
        self.local = local
        self.retry = retry

    @property
    def atomic_rename(self) -> bool:
        """Whether renaming a directory is atomic (POSIX local filesystem only)."""
        return self.local

    # -- failure handling --------------------------------------------------------------
    def _call(
        self, op: str, path: str, fn: Callable[[], _T], *, retry: bool = True, inject: str | None = None
    ) -> _T:
        """Run one operation, retrying transient errors; persistent ones become StorageError.

        ``inject`` names the operation kind a fault-injecting filesystem is asked about first
        (for operations done with ``os`` directly, which bypass the filesystem object).
        """
        delays = self.retry.delays() if retry else []
        for attempt in range(len(delays) + 1):
            try:
                if inject is not None:
                    self._inject(inject, path)
                return fn()
            except Exception as e:
                if attempt < len(delays) and is_transient(e):
                    time.sleep(delays[attempt])
                    continue
                raise storage_error(e, op, path, attempt + 1) from e
        raise AssertionError("unreachable")  # pragma: no cover

    def _inject(self, op: str, path: str) -> None:
        """A fault-injecting filesystem's verdict on an operation done with ``os`` directly."""
        inject = getattr(self.fs, "inject", None)
        if inject is not None:
            inject(op, self._local(path))

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
        return self._call("exists", path, lambda: bool(self.fs.exists(path)))

    def isdir(self, path: str) -> bool:
        return self._call("isdir", path, lambda: bool(self.fs.isdir(path)))

    def isfile(self, path: str) -> bool:
        return self._call("isfile", path, lambda: bool(self.fs.isfile(path)))

    def size(self, path: str) -> int:
        return self._call("size", path, lambda: int(self.fs.size(path)))

    def ls(self, path: str) -> list[str]:
        """Sorted basenames of the entries of a directory ([] when it does not exist)."""
        try:
            entries = self._call("list", path, lambda: self.fs.ls(path, detail=False))
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
        for full in self._call("list", path, lambda: self.fs.find(path)):
            full = str(full)
            rel = full[len(root) :].lstrip("/") if full.startswith(root) else full
            out.append(rel)
        return sorted(out)

    # -- reads ---------------------------------------------------------------------------
    def open(self, path: str, mode: str = "rb") -> IO[Any]:
        """Open a file; a stream opened for writing reports failures as :class:`StorageError`."""
        if "w" in mode or "a" in mode:
            storage_op("write", path)
            self._ensure_parent(path)
            raw = self._call("write", path, lambda: self.fs.open(path, mode))
            return GuardedFile(raw, path)  # type: ignore[return-value]
        return self._call("read", path, lambda: self.fs.open(path, mode))

    def read_bytes(self, path: str) -> bytes:
        try:
            return self._call("read", path, lambda: bytes(self.fs.cat_file(path)))
        except FileNotFoundError as e:
            raise CheckpointNotFoundError(f"{path}: file does not exist") from e

    def read_text(self, path: str) -> str:
        return self.read_bytes(path).decode("utf-8")

    # -- writes --------------------------------------------------------------------------
    def makedirs(self, path: str) -> None:
        storage_op("mkdir", path)
        self._call("mkdir", path, lambda: self.fs.makedirs(path, exist_ok=True), inject="mkdir")

    def write_bytes(self, path: str, data: bytes, *, fsync: bool = True) -> None:
        """Write a whole file, creating parents (on local disk fsynced; one PUT on object stores)."""
        storage_op("write", path)
        self._ensure_parent(path)

        def write() -> None:
            with self.fs.open(path, "wb") as f:
                f.write(data)
                if fsync and self.local:
                    f.flush()
                    storage_op("fsync", path)
                    self._inject("fsync", path)  # inside the retried write
                    os.fsync(f.fileno())

        self._call("write", path, write)

    def write_bytes_atomic(self, path: str, data: bytes) -> None:
        """Replace a file so that readers see the old or the new content, never a mix.

        On POSIX: write a temporary sibling, fsync, rename over, fsync the directory.
        On object stores a single PUT is already atomic. The temporary name carries the
        writer's pid (``<name>.tmp-<pid>-<hex>``) so that a later cleanup can tell a dead
        writer's leftover from a live one's.
        """
        if not self.local:
            self.write_bytes(path, data)
            return
        tmp = f"{path}{TMP_INFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            self.write_bytes(tmp, data)
            storage_op("rename", f"{tmp} -> {path}")
            replace = lambda: os.replace(self._local(tmp), self._local(path))  # noqa: E731
            self._call("rename", path, replace, inject="rename")  # a failed rename(2) did nothing
        except BaseException:
            with contextlib.suppress(OSError):
                self.fs.rm_file(tmp)
            raise
        self.fsync_dir(self.parent(path))

    def rename(self, src: str, dst: str) -> None:
        """Rename a file or directory (atomic only where :attr:`atomic_rename`)."""
        storage_op("rename", f"{src} -> {dst}")
        if self.local:
            move = lambda: os.rename(self._local(src), self._local(dst))  # noqa: E731
            self._call("rename", src, move, inject="rename")  # a failed rename(2) did nothing
        elif self.isdir(src):
            # Object stores: copy every object, then delete the originals (not atomic).
            for rel in self.walk_files(src):
                s, d = self.join(src, rel), self.join(dst, rel)
                self._call("copy", s, lambda s=s, d=d: self.fs.copy(s, d))  # type: ignore[misc]
            self.rm(src, recursive=True)
        else:
            self._call("rename", src, lambda: self.fs.mv(src, dst), retry=False)

    def rm(self, path: str, recursive: bool = False) -> None:
        """Remove a file or (with ``recursive``) a tree; a missing path is not an error."""
        storage_op("delete", path)
        try:
            if recursive:
                self._call("delete", path, lambda: self.fs.rm(path, recursive=True))
            else:
                self._call("delete", path, lambda: self.fs.rm_file(path))
        except FileNotFoundError:
            pass

    def fsync_dir(self, path: str) -> None:
        """Make a directory's entries (a rename, a new file) durable; no-op off POSIX."""
        if not self.local:
            return
        storage_op("fsync", path)

        def sync() -> None:
            fd = os.open(self._local(path), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        self._call("fsync", path, sync, inject="fsync")

    def _ensure_parent(self, path: str) -> None:
        # Object stores have no directories; local files need theirs.
        if self.local:
            parent = os.path.dirname(self._local(path))
            if not os.path.isdir(parent):
                self._call("mkdir", parent, lambda: os.makedirs(parent, exist_ok=True), inject="mkdir")

    def _local(self, path: str) -> str:
        return str(self.fs._strip_protocol(path))


TMP_INFIX = ".tmp-"


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
    options = dict(storage_options or {})
    scheme = path.split("://", 1)[0] if "://" in path else "file"
    if scheme not in _UNCACHED_PROTOCOLS:
        # Another process (the writer, the pruner) changes the store under us: a cached
        # listing would show deleted checkpoints as present and new ones as absent.
        options.setdefault("use_listings_cache", False)
    if scheme in ("s3", "s3a") and "endpoint_url" not in options:
        # fsspec caches filesystems by their arguments: an endpoint taken from the environment
        # must be one of them, or a cached client keeps talking to an earlier endpoint.
        env_endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if env_endpoint and "endpoint_url" not in options.get("client_kwargs", {}):
            options["endpoint_url"] = env_endpoint
    try:
        fs, _ = url_to_fs(path, **options)
    except (ValueError, ImportError) as e:
        raise ConfigError(
            f"cannot open storage for {path!r}: {e}. Use a local path or a URL whose fsspec"
            " backend is installed (e.g. 's3://' needs the 's3fs' package)."
        ) from e
    local = getattr(fs, "target_is_local", None)  # a fault-injecting wrapper says what it wraps
    if local is None:
        protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
        local = bool(set(protocols) & _LOCAL_PROTOCOLS)
    return Storage(fs, local=bool(local))
