"""Debug and test knobs, read from the environment in one place.

``RECKPT_FAULT_KILL_AT=<point>[@<rank>]`` makes the process SIGKILL itself when it
reaches the named fault point (on every rank, or only on ``<rank>``). The crash tests
use it to stop a save at each phase of the commit protocol. Points: ``begin``,
``after_<part>`` (e.g. ``after_model``), ``before_commit``, ``after_manifest``,
``committed``; while deleting a checkpoint: ``delete_renamed`` (POSIX), ``delete_marked``,
``delete_unmanifested`` (object stores).

``RECKPT_FAULT_KILL_AT=op:<k>`` instead counts the storage operations this process makes
(every write, fsync, rename, delete and mkdir of :class:`reckpt.storage.Storage`, from 1)
and SIGKILLs it just before operation ``k``. ``RECKPT_FAULT_TRACE=<file>`` appends one
line per counted operation (``<k>\\t<kind>\\t<path>``) to ``<file>``, written unbuffered so
that it survives the kill; :func:`op_phase` names the phase of the commit protocol an
operation belongs to. The crash-injection harness (``benchmarks/reliability.py``) uses both.
"""

from __future__ import annotations

import os
import signal

from reckpt.fork_lock import ForkSafeLock

__all__ = ["fault_point", "storage_op", "op_phase", "reset_op_count", "PHASES"]

_KILL_AT = "RECKPT_FAULT_KILL_AT"
_TRACE = "RECKPT_FAULT_TRACE"

PHASES = ("data", "fsync", "manifest", "commit", "prune", "sidecar", "other")

_lock = ForkSafeLock()
_count = 0


def fault_point(name: str, rank: int = 0) -> None:
    """SIGKILL this process when ``RECKPT_FAULT_KILL_AT`` names this point (test knob)."""
    spec = os.environ.get(_KILL_AT)
    if not spec:
        return
    point, _, only_rank = spec.partition("@")
    if point == name and (not only_rank or int(only_rank) == rank):
        os.kill(os.getpid(), signal.SIGKILL)


def reset_op_count() -> None:
    """Start counting storage operations from 1 again (a forked writer calls it first)."""
    global _count
    with _lock:
        _count = 0


def storage_op(kind: str, path: str) -> None:
    """Count one storage operation; trace it and SIGKILL before it when the knobs say so."""
    kill_spec = os.environ.get(_KILL_AT, "")
    trace = os.environ.get(_TRACE)
    if not trace and not kill_spec.startswith("op:"):
        return
    global _count
    with _lock:
        _count += 1
        index = _count
        if trace:
            fd = os.open(trace, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{index}\t{kind}\t{path}\n".encode())
            finally:
                os.close(fd)
        if kill_spec.startswith("op:") and index == int(kill_spec[3:]):
            os.kill(os.getpid(), signal.SIGKILL)


def op_phase(kind: str, path: str) -> str:
    """The commit-protocol phase of a storage operation (one of :data:`PHASES`; pure).

    Examples:
        >>> op_phase("write", "run/.reckpt-staging.ab/model/__0_0.distcp")
        'data'
        >>> op_phase("write", "run/.reckpt-staging.ab/reckpt.json")
        'manifest'
        >>> op_phase("rename", "run/.reckpt-staging.ab -> run/model.ckpt-5")
        'commit'
        >>> op_phase("rename", "run/model.ckpt-1 -> run/.reckpt-trash.cd")
        'prune'
    """
    last = path.rsplit(" -> ", 1)[-1]
    name = last.rstrip("/").rsplit("/", 1)[-1]
    if ".sidecar.json" in name:
        return "sidecar"
    if ".reckpt-trash." in last or name == ".reckpt-deleting":
        return "prune"
    if kind == "fsync":
        return "fsync"
    if name == "reckpt.json":
        return "prune" if kind == "delete" else "manifest"
    if name == ".metadata":  # DCP renames its metadata into place while writing a part
        return "data"
    if kind == "rename" or name in (".reckpt-in-progress", ".reckpt-owner.json", ".reckpt-replace.json"):
        return "commit"
    if "model.ckpt-" in last and kind == "delete":
        return "prune"
    if kind == "write" and ("/.reckpt-staging." in last or "model.ckpt-" in last):
        return "data"
    return "other"
