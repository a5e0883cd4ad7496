"""A module-level lock that a forked child gets back unlocked.

``os.fork`` copies a lock in whatever state it is; if another thread of the parent held it
at that instant, the child (``reckpt.save.fork_snapshot``) would block on it forever. Locks that
the child's writing path takes are made with :class:`ForkSafeLock`, which replaces its lock
in the child right after a fork.
"""

from __future__ import annotations

import os
import threading

__all__ = ["ForkSafeLock"]


class ForkSafeLock:
    """A ``threading.Lock`` for ``with`` blocks, fresh (unlocked) in every forked child.

    Meant for module-level locks: each instance stays registered with ``os.register_at_fork``
    for the life of the process.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._renew)

    def _renew(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> ForkSafeLock:
        self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
