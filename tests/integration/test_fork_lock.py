"""ForkSafeLock: a lock held by the parent at fork time is free in the child."""

from __future__ import annotations

import os

from reckpt.storage.fork_lock import ForkSafeLock


def test_a_child_forked_while_the_lock_is_held_can_take_it() -> None:
    lock = ForkSafeLock()
    with lock:
        pid = os.fork()
        if pid == 0:  # the child: would block forever on an inherited, held lock
            ok = lock._lock.acquire(timeout=5)
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    with lock:  # and the parent's lock still works
        pass
