"""reckpt's error hierarchy.

Every error subclasses the builtin it refines, so callers can catch either the
precise reckpt type or the builtin (``except FileNotFoundError`` keeps working).
Messages say what failed, where (path, key, file and line), why, and what to do.

Example:
    >>> from reckpt.errors import CheckpointNotFoundError
    >>> issubclass(CheckpointNotFoundError, FileNotFoundError)
    True
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "StepAlreadyExistsError",
    "IncompleteCheckpointError",
    "IntegrityError",
    "UnsafeCheckpointError",
    "KeyMismatchError",
    "ShapeMismatchError",
    "ParamMapError",
    "ConfigError",
    "DistributedCheckpointError",
    "SnapshotProcessError",
]


class CheckpointError(Exception):
    """Base class of every reckpt error (never raised directly)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint directory, or a required part of it, does not exist."""


class StepAlreadyExistsError(CheckpointError, FileExistsError):
    """A save targets a step that is already committed and ``overwrite`` is off."""


class IncompleteCheckpointError(CheckpointError, RuntimeError):
    """The path holds a checkpoint that was never committed (a crashed save)."""


class IntegrityError(CheckpointError, ValueError):
    """A file's size or checksum differs from the manifest, or a file is missing."""


class UnsafeCheckpointError(CheckpointError, ValueError):
    """A checkpoint file carries something reckpt refuses to load (e.g. a pickle payload)."""


class KeyMismatchError(CheckpointError, KeyError, RuntimeError):
    """Keys requested by the model are missing from the checkpoint (strict mode).

    It is both a ``KeyError`` (reckpt's earlier contract) and a ``RuntimeError`` (what
    TorchEasyRec's ``restore_model(..., error_on_missing_keys=True)`` raises), so callers
    written for either keep catching it. ``KeyError`` quotes its message with ``repr``;
    ``__str__`` is overridden so the multi-line message stays readable.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ShapeMismatchError(CheckpointError, ValueError):
    """A checkpoint tensor's shape cannot be loaded into the current tensor."""


class ParamMapError(CheckpointError, ValueError):
    """A parameter-map file has a malformed line (the message names file and line)."""


class ConfigError(CheckpointError, ValueError):
    """An argument or configuration value is invalid."""


class DistributedCheckpointError(CheckpointError, RuntimeError):
    """A collective save or load failed on one or more ranks.

    Unlike ``torch.distributed.checkpoint.api.CheckpointException`` (a
    ``BaseException``), this is an ordinary ``Exception``.

    Attributes:
        failures: rank -> the exception raised on that rank.
    """

    def __init__(self, message: str, failures: dict[int, BaseException] | None = None) -> None:
        super().__init__(message)
        self.failures: dict[int, BaseException] = dict(failures or {})


class SnapshotProcessError(CheckpointError, ChildProcessError):
    """The process writing a copy-on-write snapshot (``async_snapshot="fork"``) failed or died.

    The save it belonged to is aborted; committed checkpoints are untouched.
    """
