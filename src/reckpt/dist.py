"""A thin wrapper over ``torch.distributed`` that degrades to one process.

Every reckpt entry point is collective when a process group is initialised and works
unchanged without one (rank 0 of world 1). Decisions every rank must share are made
on rank 0 and broadcast; failures on any rank are gathered so that all ranks raise.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch.distributed as dist

from reckpt.errors import CheckpointError, DistributedCheckpointError

__all__ = ["Dist"]

T = TypeVar("T")


class Dist:
    """Rank, world size and object collectives on an optional process group.

    Args:
        group: the process group; ``None`` means the default group when initialised.
    """

    def __init__(self, group: Any = None) -> None:
        self.active = dist.is_available() and dist.is_initialized()
        self.group = group
        self.rank = dist.get_rank(group) if self.active else 0
        self.world_size = dist.get_world_size(group) if self.active else 1

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=self.group)

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self._global_rank(0), group=self.group)
        return box[0]

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, ordered by rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def raise_if_any(self, error: BaseException | None, what: str) -> None:
        """Collective: raise on every rank when ``error`` is set on any rank.

        The lowest failing rank's error is re-raised as is when it is a reckpt error (so
        every rank raises the same, well-described exception); otherwise a
        :class:`DistributedCheckpointError` lists all failures.
        """
        errors = self.all_gather(error)
        failures = {r: e for r, e in enumerate(errors) if e is not None}
        if not failures:
            return
        first_rank = min(failures)
        first = failures[first_rank]
        if isinstance(first, CheckpointError) and len({type(e) for e in failures.values()}) == 1:
            raise first
        detail = "; ".join(f"rank {r}: {type(e).__name__}: {e}" for r, e in sorted(failures.items()))
        raise DistributedCheckpointError(f"{what} failed on {len(failures)} rank(s): {detail}", failures)

    def _global_rank(self, group_rank: int) -> int:
        if self.group is None:
            return group_rank
        return int(dist.get_global_rank(self.group, group_rank))
