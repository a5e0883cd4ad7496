"""Debug knobs on the storage layer's operations, read from the environment in one place.

``RECKPT_FAULT_KILL_AT=<point>[@<rank>]`` makes the process SIGKILL itself when it
reaches the named fault point (on every rank, or only on ``<rank>``). The crash tests
use it to stop a save at each phase of the commit protocol. Points: ``begin``,
``after_<part>`` (e.g. ``after_model``), ``before_commit``, ``after_manifest``,
``committed``; while deleting a checkpoint: ``delete_renamed`` (POSIX), ``delete_marked``,
``delete_unmanifested`` (object stores).

``RECKPT_FAULT_KILL_AT=op:<k>`` instead counts the storage operations this process makes
(every write, fsync, rename, delete and mkdir of :class:`reckpt.storage.core.Storage`, from 1)
and SIGKILLs it just before operation ``k``. ``RECKPT_FAULT_TRACE=<file>`` appends one
line per counted operation (``<k>\\t<kind>\\t<path>``) to ``<file>``, written unbuffered so
that it survives the kill. The crash-injection harness (``benchmarks/kill_harness.py``) uses
both, and :func:`reckpt.testing.kill_points.op_phase` names the phase of each traced operation.
"""

from __future__ import annotations

import os
import signal

from reckpt.storage.fork_lock import ForkSafeLock

__all__ = ["fault_point", "storage_op", "reset_op_count"]

_KILL_AT = "RECKPT_FAULT_KILL_AT"
_TRACE = "RECKPT_FAULT_TRACE"

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
