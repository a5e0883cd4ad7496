"""``DynamicEmbedding``: a pooled embedding over int64 ids not known in advance, sharded by key.

Each rank stores the rows of the keys with ``key % world_size == rank``. A forward sends
every unique id of the local batch to its owner (``all_to_all_single``), the owners look
the rows up (creating them on first sight in training) and send them back; the backward
sends each id's summed gradient to its owner, which applies row-wise Adagrad at once, the
way TorchRec's fused tables do. The module has no parameters and no buffers: nothing of
it appears in ``state_dict()``, so DCP, DDP and DistributedModelParallel (which broadcast
buffers) never see it. Its state is saved in the checkpoint's ``dynamicemb/`` folder
(:mod:`reckpt.dynamic.dump`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from reckpt.dynamic.table import DynamicTable
from reckpt.errors import ConfigError

__all__ = ["DynamicEmbedding"]

_GROUP: list[tuple[Any, Any]] = []  # [(default group, the dedicated group made for it)]


def _dedicated_group() -> Any:
    """One extra gloo group (created collectively at first use) for every dynamic table.

    The lookups and gradient exchanges run inside forward and backward; on their own group
    they can never interleave with the collectives of DDP or DistributedModelParallel.
    A new default group (after ``destroy_process_group``) gets a new dedicated group.
    """
    world = dist.GroupMember.WORLD
    if not _GROUP or _GROUP[0][0] is not world:
        _GROUP[:] = [(world, dist.new_group(backend="gloo"))]
    return _GROUP[0][1]


class DynamicEmbedding(nn.Module):
    """A pooled (sum or mean) embedding table keyed by arbitrary int64 ids, sharded by ``key % W``.

    Args:
        embedding_dim: row width.
        name: table name in the checkpoint (default: the module's attribute name).
        mode: ``"sum"`` or ``"mean"`` pooling of each bag.
        capacity: most rows one rank holds (``None``: unbounded); beyond it the rows of
            lowest eviction score are evicted.
        eviction: ``"lru"`` (score: last step seen) or ``"lfu"`` (score: times seen).
        admit_threshold: times an id must be seen before it gets a row; until then it reads
            a zero row and does not train (``0``/``1``: admitted at once).
        lr: row-wise Adagrad learning rate (applied in backward).
        eps: Adagrad epsilon.
        seed: initializer seed: a row's initial value depends only on (seed, key).
        init_bound: initial values are uniform in ``[-init_bound, init_bound)``
            (default ``1/sqrt(embedding_dim)``).
        process_group: the group sharding the table (default: a dedicated group spanning
            the default group, created at first use; no process group: one shard).

    Example:
        >>> emb = DynamicEmbedding(4, name="user")
        >>> out = emb(torch.tensor([10, 99, 10]), torch.tensor([0, 2, 3]))
        >>> tuple(out.shape), len(emb.table)
        ((2, 4), 2)
    """

    def __init__(
        self,
        embedding_dim: int,
        *,
        name: str | None = None,
        mode: str = "sum",
        capacity: int | None = None,
        eviction: str = "lru",
        admit_threshold: int = 0,
        lr: float = 0.01,
        eps: float = 1e-8,
        seed: int = 0,
        init_bound: float = 0.0,
        process_group: Any = None,
    ) -> None:
        super().__init__()
        if mode not in ("sum", "mean"):
            raise ConfigError(f"DynamicEmbedding: mode must be 'sum' or 'mean', got {mode!r}")
        self.embedding_dim, self.name, self.mode = embedding_dim, name, mode
        self.lr, self.eps = lr, eps
        self.table = DynamicTable(
            embedding_dim,
            capacity=capacity,
            eviction=eviction,
            admit_threshold=admit_threshold,
            seed=seed,
            init_bound=init_bound,
        )
        self._pg = process_group

    # -- sharding ----------------------------------------------------------------------
    def shard_group(self) -> Any:
        """The process group the table is sharded over (``None``: one process)."""
        if self._pg is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._pg = _dedicated_group()
        return self._pg

    def shard(self) -> tuple[int, int]:
        """``(rank, world_size)`` of this process in the table's sharding."""
        group = self.shard_group()
        if group is None:
            return 0, 1
        return dist.get_rank(group), dist.get_world_size(group)

    # -- tracking (incremental checkpoints) --------------------------------------------
    def touched_keys(self) -> torch.Tensor:
        """This rank's keys whose row, optimizer row, score or counter changed since :meth:`clear_touched`."""
        return self.table.touched_keys()

    def removed_keys(self) -> torch.Tensor:
        """This rank's keys evicted since :meth:`clear_touched` (and not re-added)."""
        return self.table.removed_keys()

    def clear_touched(self) -> None:
        self.table.clear_touched()

    # -- forward / backward ------------------------------------------------------------
    def forward(self, ids: Any, offsets: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled rows of each bag.

        Args:
            ids: int64 ids of all bags, concatenated (or a TorchRec ``JaggedTensor``).
            offsets: ``B + 1`` bag boundaries into ``ids`` (taken from ``ids`` when it is a
                ``JaggedTensor``).

        Returns:
            ``[B, embedding_dim]`` float32.
        """
        if offsets is None:
            if not (callable(getattr(ids, "values", None)) and callable(getattr(ids, "offsets", None))):
                raise ConfigError("DynamicEmbedding: pass (ids, offsets), or a JaggedTensor")
            ids, offsets = ids.values(), ids.offsets()
        if ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32):
            raise ConfigError(
                f"DynamicEmbedding: ids must be a 1-D integer tensor, got {ids.dtype} {tuple(ids.shape)}"
            )
        ids = ids.to(torch.int64)
        uniq, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
        train = self.training and torch.is_grad_enabled()
        rows, backward = self._fetch(uniq, counts, train)
        if train:
            rows.requires_grad_(True)
            register: Any = rows.register_hook  # untyped in torch's stubs
            register(backward)
        return nn.functional.embedding_bag(
            inverse, rows, offsets.to(torch.int64), mode=self.mode, include_last_offset=True
        )

    def _fetch(self, uniq: torch.Tensor, counts: torch.Tensor, train: bool) -> tuple[torch.Tensor, Any]:
        """Rows of ``uniq`` (zeros where there is no row) and the hook that trains them."""
        _, world = self.shard()
        if world == 1:
            slots = self.table.lookup(uniq, counts, train)
            return self._rows(slots), lambda grad: self._train(uniq, slots, grad)
        group = self.shard_group()
        owner = torch.remainder(uniq, world)
        order = torch.argsort(owner, stable=True)
        send = torch.bincount(owner, minlength=world)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)
        send_sizes, recv_sizes = send.tolist(), recv.tolist()

        def exchange(x: torch.Tensor, out_sizes: list[int], in_sizes: list[int]) -> torch.Tensor:
            out = x.new_empty((sum(out_sizes), *x.shape[1:]))
            dist.all_to_all_single(out, x.contiguous(), out_sizes, in_sizes, group=group)
            return out

        asked = exchange(torch.stack([uniq[order], counts[order]], dim=1), recv_sizes, send_sizes)
        mine, inv = torch.unique(asked[:, 0], return_inverse=True)
        mine_counts = torch.zeros(len(mine), dtype=torch.int64).index_add_(0, inv, asked[:, 1])
        slots = self.table.lookup(mine, mine_counts, train)
        sorted_rows = exchange(self._rows(slots)[inv], send_sizes, recv_sizes)
        rows = torch.empty_like(sorted_rows)
        rows[order] = sorted_rows

        def backward(grad: torch.Tensor) -> None:
            got = exchange(grad[order], recv_sizes, send_sizes)
            summed = torch.zeros(len(mine), self.embedding_dim).index_add_(0, inv, got)
            self._train(mine, slots, summed)

        return rows, backward

    def _rows(self, slots: torch.Tensor) -> torch.Tensor:
        rows = torch.zeros(len(slots), self.embedding_dim)
        have = slots >= 0
        rows[have] = self.table.values[slots[have]]
        return rows

    @torch.no_grad()
    def _train(self, keys: torch.Tensor, slots: torch.Tensor, grad: torch.Tensor) -> None:
        # Rows admitted after the forward (or evicted since) do not take this gradient.
        now = self.table.lookup(keys, None, train=False)
        now[slots < 0] = -1
        self.table.adagrad(now, grad, self.lr, self.eps)

    def extra_repr(self) -> str:
        t = self.table
        return (
            f"{self.embedding_dim}, name={self.name!r}, mode={self.mode!r}, rows={len(t)},"
            f" capacity={t.capacity}, eviction={t.eviction!r}, admit_threshold={t.admit_threshold}"
        )
