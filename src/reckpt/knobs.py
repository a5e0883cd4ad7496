"""Debug and test knobs, read from the environment in one place.

``RECKPT_FAULT_KILL_AT=<point>[@<rank>]`` makes the process SIGKILL itself when it
reaches the named fault point (on every rank, or only on ``<rank>``). The crash tests
use it to stop a save at each phase of the commit protocol. Points: ``begin``,
``after_<part>`` (e.g. ``after_model``), ``before_commit``, ``after_manifest``,
``committed``; while deleting a checkpoint: ``delete_renamed`` (POSIX), ``delete_marked``,
``delete_unmanifested`` (object stores).
"""

from __future__ import annotations

import os
import signal

__all__ = ["fault_point"]

_KILL_AT = "RECKPT_FAULT_KILL_AT"


def fault_point(name: str, rank: int = 0) -> None:
    """SIGKILL this process when ``RECKPT_FAULT_KILL_AT`` names this point (test knob)."""
    spec = os.environ.get(_KILL_AT)
    if not spec:
        return
    point, _, only_rank = spec.partition("@")
    if point == name and (not only_rank or int(only_rank) == rank):
        os.kill(os.getpid(), signal.SIGKILL)
