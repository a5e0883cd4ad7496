"""Preemption: SIGTERM / SIGUSR1 ask a training loop to save and stop cleanly.

Cluster schedulers stop a job with SIGTERM (SLURM sends SIGUSR1 first when it requeues);
Python's default for SIGTERM ends the process at once, losing everything since the last
checkpoint. Inside ``with Preemption() as p`` the signals only record the request; the loop
asks :meth:`Preemption.requested` after each step (a collective, so every rank stops at the
same step) and then saves and exits normally.

Example:
    >>> # with reckpt.Preemption() as preemption:
    >>> #     for step, batch in enumerate(data):
    >>> #         ...
    >>> #         if preemption.requested():
    >>> #             mgr.save(step, model, optimizer, dataloader_state=position)
    >>> #             break
    >>> # mgr.close()  # waits for the commit
"""

from __future__ import annotations

import signal
from typing import Any

__all__ = ["Preemption"]


class Preemption:
    """SIGTERM / SIGUSR1 (SLURM's requeue signal) ask for a save and a clean exit.

    The handler only records the request; the training loop checks it after each step,
    agreeing across ranks (one all-reduce) so that every rank saves at the same step. The
    previous handlers come back on exit.

    Args:
        process_group: the ranks that must agree (default: the default group, if any).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, process_group: Any = None) -> None:
        self.signum = 0
        self._pg = process_group
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Preemption:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def requested(self) -> bool:
        """Collective: whether any rank received a signal (every rank of ``process_group``
        calls it at the same point; without a process group, this process's own signal)."""
        import torch
        import torch.distributed as dist

        from reckpt.dist import Dist

        d = Dist(self._pg)
        if not d.active:
            return bool(self.signum)
        flag = torch.tensor([1 if self.signum else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=d.group)  # one small all-reduce per call
        return bool(flag.item())

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
