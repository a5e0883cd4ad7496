"""Storage failures: which are worth another attempt, and how a lasting one is reported.

A lasting failure (or one that is not transient: a full disk, a read-only location, a denied
permission, a file-size limit) is raised as :class:`StorageError`, which names the path, the
operation, the cause (``ENOSPC`` ...) and what to do. :class:`GuardedFile` gives a stream
opened for writing the same reporting, and writes all of a buffer or fails.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, TypeVar

from reckpt.errors import CheckpointError

__all__ = [
    "TRANSIENT_ERRNOS",
    "StorageError",
    "RetryPolicy",
    "RETRY",
    "is_transient",
    "storage_error",
    "GuardedFile",
]

_T = TypeVar("_T")

#: errno values worth another attempt (network filesystems and object stores recover).
TRANSIENT_ERRNOS = frozenset(
    {
        errno.EIO,
        getattr(errno, "EREMOTEIO", errno.EIO),  # s3fs: a 5xx answer
        errno.EAGAIN,
        errno.EBUSY,
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EPIPE,
    }
)
_HINTS = {
    errno.ENOSPC: "the storage is full; free space or choose another model_dir",
    errno.EDQUOT: "the storage quota is exhausted; free space or choose another model_dir",
    errno.EROFS: "the location is read-only; choose a writable model_dir",
    errno.EACCES: "permission denied; choose a model_dir this user may write",
    errno.EPERM: "operation not permitted; choose a model_dir this user may write",
    errno.EFBIG: "the file exceeds the size limit of the filesystem or of this process (ulimit -f)",
}


class StorageError(CheckpointError, OSError):
    """A storage operation failed for good (after retries, or with a non-transient error).

    ``errno`` is the underlying error's; the message names the path, the operation and
    what to do. Checkpoints committed before the failure are untouched.
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded exponential backoff for transient storage errors.

    Example:
        >>> RetryPolicy().delays()
        [0.05, 0.1, 0.2]
    """

    attempts: int = 4
    first_delay_s: float = 0.05
    max_delay_s: float = 1.0

    def delays(self) -> list[float]:
        """Sleeps between attempts (``attempts - 1`` of them)."""
        return [min(self.first_delay_s * 2**i, self.max_delay_s) for i in range(self.attempts - 1)]


RETRY = RetryPolicy()


def is_transient(error: BaseException) -> bool:
    """Whether another attempt may succeed (timeouts, dropped connections, EIO, EAGAIN ...)."""
    if isinstance(error, CheckpointError | FileNotFoundError | FileExistsError | IsADirectoryError):
        return False
    if isinstance(error, ConnectionError | TimeoutError):
        return True
    if isinstance(error, OSError):
        return error.errno in TRANSIENT_ERRNOS
    name = type(error).__name__
    module = type(error).__module__
    return module.startswith(("botocore", "aiobotocore", "aiohttp")) and (
        "Connection" in name or "Timeout" in name or name == "HTTPClientError"
    )


def storage_error(error: BaseException, op: str, path: str, attempts: int) -> BaseException:
    """``error`` as a :class:`StorageError` when it is a storage failure worth explaining."""
    if isinstance(error, CheckpointError | FileNotFoundError | FileExistsError):
        return error
    code = getattr(error, "errno", None)
    if code in _HINTS:
        hint = _HINTS[code]
    elif is_transient(error):
        hint = f"gave up after {attempts} attempt(s); check the storage and retry"
    else:
        return error
    if isinstance(code, int):
        what = f"{errno.errorcode.get(code, code)}: {os.strerror(code)}"
    else:
        what = f"{type(error).__name__}: {error}"
    return StorageError(f"{path}: {op} failed ({what}); {hint}", code if isinstance(code, int) else None)


class GuardedFile:
    """A writable file whose failures (a full disk mid-write) read as :class:`StorageError`."""

    def __init__(self, raw: IO[bytes], path: str) -> None:
        self._raw = raw
        self._path = path
        self.error: BaseException | None = None  # the first failure, for callers that lose it

    def _failed(self, e: Exception, op: str) -> BaseException:
        error = storage_error(e, op, self._path, 1)
        if self.error is None:
            self.error = error
        return error

    def _guard(self, op: str, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except Exception as e:
            raise self._failed(e, op) from e

    def write(self, data: Any) -> int:
        """Write all of ``data`` or raise :class:`StorageError`.

        A short write (the disk filled up after part of the buffer) is continued, so that
        the next attempt reports the real cause (``ENOSPC``) instead of a caller such as
        ``torch.save``'s zip writer failing on a position it did not expect.
        """
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            n = self._write_some(view[done:])
            if n <= 0:
                raise self._failed(OSError(errno.EIO, "the write made no progress"), "write")
            done += n
        return len(view)

    def _write_some(self, view: memoryview) -> int:
        # Only EAGAIN is retried mid-stream: it guarantees nothing was written, so the
        # bytes on disk stay exactly the bytes hashed. Anything else fails the save.
        for delay in [*RETRY.delays(), None]:
            try:
                written = self._raw.write(view)
                return len(view) if written is None else int(written)
            except OSError as e:
                if delay is None or e.errno != errno.EAGAIN or int(getattr(e, "characters_written", 0) or 0):
                    raise self._failed(e, "write") from e
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def flush(self) -> None:
        self._guard("write", self._raw.flush)

    def close(self) -> None:
        self._guard("write", self._raw.close)

    def fileno(self) -> int:
        return self._raw.fileno()

    def tell(self) -> int:
        return self._raw.tell()

    @property
    def closed(self) -> bool:
        return bool(self._raw.closed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def __enter__(self) -> GuardedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
