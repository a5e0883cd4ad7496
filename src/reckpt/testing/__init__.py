"""Fault injection for tests and the reliability report (never imported by the library itself).

:class:`~reckpt.testing.faults.FaultyFileSystem` is registered with fsspec as the
``faulty://`` protocol through the package's entry point; :mod:`reckpt.testing.kill_points`
classifies traced storage operations by commit phase.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from reckpt._lazy import lazy_exports

_EXPORTS = {
    "Fault": "reckpt.testing.faults",
    "FaultInjector": "reckpt.testing.faults",
    "FaultyFileSystem": "reckpt.testing.faults",
    "FaultProxy": "reckpt.testing.faults",
    "disk_full": "reckpt.testing.faults",
    "read_only": "reckpt.testing.faults",
    "PHASES": "reckpt.testing.kill_points",
    "op_phase": "reckpt.testing.kill_points",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from reckpt.testing.faults import Fault as Fault
    from reckpt.testing.faults import FaultInjector as FaultInjector
    from reckpt.testing.faults import FaultProxy as FaultProxy
    from reckpt.testing.faults import FaultyFileSystem as FaultyFileSystem
    from reckpt.testing.faults import disk_full as disk_full
    from reckpt.testing.faults import read_only as read_only
    from reckpt.testing.kill_points import PHASES as PHASES
    from reckpt.testing.kill_points import op_phase as op_phase
