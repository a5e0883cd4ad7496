"""Filling a node's part of a checkpoint before a restart: files from other nodes, or from a shared tier.

A :class:`~reckpt.tiers.select.Plan` may ask a node to complete its part of the chosen
checkpoint (see :mod:`reckpt.tiers.select`). :func:`run_fills` is collective: for each file,
in the plan's order (the same on every rank), the lowest rank of the node holding it streams
it over the process group (``send``/``recv``, in pieces) to the lowest rank of the node that
lacks it, which checks size and checksum against the manifest and moves it into place under a
temporary name, so a part never holds a file that is half there. A file with no other node to
give it is copied from a complete copy on a shared tier by the receiving node alone. Every rank
raises when any copy failed; the restart then plans again without those parts.
"""

from __future__ import annotations

import contextlib
import functools
import os
import uuid
from collections.abc import Mapping, Sequence
from typing import IO, Any, cast

import torch
import torch.distributed as dist

from reckpt.dist import Dist
from reckpt.errors import IntegrityError
from reckpt.format.integrity import HashingWriter, read_some
from reckpt.format.manifest import Manifest, read_manifest
from reckpt.storage.core import TMP_INFIX, Storage
from reckpt.tiers.config import TierSet
from reckpt.tiers.nodes import NodeLayout
from reckpt.tiers.promote import copy_file
from reckpt.tiers.select import SHARED, Plan

__all__ = ["run_fills", "part_sources", "PIECE"]

PIECE = 64 << 20
"""Bytes per message of a file sent to another node."""


def _global(group: Any, rank: int) -> int:
    return rank if group is None else int(dist.get_global_rank(group, rank))


def run_fills(d: Dist, layout: NodeLayout, chosen: Plan, tiers: TierSet, storages: Sequence[Storage]) -> int:
    """Collective: carry out the plan's fills; returns the bytes this rank received or copied.

    Raises:
        IntegrityError: a file arrived damaged (on every rank: the lowest failing rank's error).
    """
    received = 0
    err: BaseException | None = None
    manifests: dict[int, Manifest] = {}

    def manifest(tier: int) -> Manifest:
        if tier not in manifests:
            path = tiers.tiers[tier].checkpoint_dir(chosen.step)
            found = read_manifest(storages[tier], path)
            if found is None:
                raise IntegrityError(f"{path}: no manifest")
            manifests[tier] = found
        return manifests[tier]

    for fill in chosen.fills:
        dst = storages[fill.tier]
        dst_dir = tiers.tiers[fill.tier].checkpoint_dir(chosen.step)
        receiving = layout.leader and layout.node == fill.node
        for rel, src_node, src_tier in fill.files:
            src = Storage.join(tiers.tiers[src_tier].checkpoint_dir(chosen.step), rel)
            if src_node == SHARED:
                if receiving and err is None:
                    try:
                        rec = manifest(fill.tier).files[rel]
                        copy = functools.partial(copy_file, storages[src_tier], src, dst)
                        received += _place(
                            dst, dst_dir, rel, lambda tmp, c=copy, r=rec: c(tmp, r.size, r.checksum)
                        )
                    except Exception as e:
                        err = e
            elif layout.leader and layout.node == src_node:
                to = _global(d.group, layout.ranks[fill.node][0])
                try:
                    size = manifest(src_tier).files[rel].size
                    stream = storages[src_tier].open(src, "rb")
                except Exception as e:
                    dist.send(torch.zeros(1, dtype=torch.int64), to, group=d.group)  # "cannot": never a hang
                    err = err or e
                    continue
                with stream:
                    _send(stream, size, to, d)
            elif receiving:
                sender = _global(d.group, layout.ranks[src_node][0])
                try:
                    rec = manifest(fill.tier).files[rel]
                    recv = functools.partial(_recv, dst, sender=sender, d=d)
                    received += _place(
                        dst, dst_dir, rel, lambda tmp, f=recv, r=rec: f(tmp, r.size, r.checksum)
                    )
                except Exception as e:
                    err = e
    d.raise_if_any(err, f"filling the node parts of step {chosen.step}")
    return received


def part_sources(
    sizes: Mapping[str, int], chosen: Plan, node: int, names: Sequence[str], read: str
) -> dict[str, dict[str, int]]:
    """Part -> where a node's bytes of it came from -> bytes (pure).

    Args:
        sizes: every file of the checkpoint and its size (the manifest's).
        chosen: the plan carried out.
        node: the node.
        names: the tiers' names, by position.
        read: the tier the node read.

    Example:
        >>> from reckpt.tiers.select import Fill
        >>> p = Plan(12, "m", (0, 0), (Fill(0, 0, (("model/__1_0.distcp", 1, 0),)),))
        >>> sizes = {"model/__0_0.distcp": 10, "model/__1_0.distcp": 7, "plan": 1}
        >>> part_sources(sizes, p, 0, ["memory"], "memory")
        {'model': {'memory': 10, 'node 1 memory': 7}, 'plan': {'memory': 1}}
    """
    filled = {
        rel: names[t] if m == SHARED else f"node {m} {names[t]}"
        for fill in chosen.fills
        if fill.node == node
        for rel, m, t in fill.files
    }
    out: dict[str, dict[str, int]] = {}
    for rel, size in sizes.items():
        where = out.setdefault(rel.split("/", 1)[0], {})
        source = filled.get(rel, read)
        where[source] = where.get(source, 0) + size
    return out


def _place(dst: Storage, dst_dir: str, rel: str, write: Any) -> int:
    """``write(tmp)`` a file next to its final name, then rename it into place."""
    final = Storage.join(dst_dir, rel)
    tmp = f"{final}{TMP_INFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        n = int(write(tmp))
        dst.rename(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            dst.rm(tmp)
        raise
    return n


def _send(stream: IO[bytes], size: int, to: int, d: Dist) -> None:
    """Stream a file to rank ``to``: a status word, then ``size`` bytes in pieces.

    A short or unreadable tail goes out as zeros, which the receiver's checksum refuses: the
    receiver is never left waiting for bytes that do not come.
    """
    dist.send(torch.ones(1, dtype=torch.int64), to, group=d.group)
    buf = torch.empty(min(PIECE, max(size, 1)), dtype=torch.uint8)
    view = memoryview(cast(Any, buf.numpy())).cast("B")
    sent = 0
    while sent < size:
        n = min(len(view), size - sent)
        got = 0
        with contextlib.suppress(OSError):
            while got < n and (k := read_some(stream, view[got:n])):
                got += k
        view[got:n] = bytes(n - got)
        dist.send(buf[:n], to, group=d.group)
        sent += n


def _recv(dst: Storage, tmp: str, size: int, checksum: str, *, sender: int, d: Dist) -> int:
    """Receive a file :func:`_send` streams; check it against its record; returns its size."""
    status = torch.zeros(1, dtype=torch.int64)
    dist.recv(status, sender, group=d.group)
    if int(status.item()) != 1:
        raise IntegrityError(f"{tmp}: the node holding it could not read it")
    got: list[tuple[int, str]] = []
    out = HashingWriter(dst.open(tmp, "wb"), lambda n, c: got.append((n, c)), writeback=dst.local)
    try:
        buf = torch.empty(min(PIECE, max(size, 1)), dtype=torch.uint8)
        done = 0
        while done < size:
            n = min(buf.numel(), size - done)
            dist.recv(buf[:n], sender, group=d.group)
            out.write(memoryview(cast(Any, buf[:n].numpy())).cast("B"))
            done += n
        if dst.local:
            os.fsync(out.fileno())
    finally:
        out.close()
    if got[0] != (size, checksum):
        raise IntegrityError(f"{tmp}: arrived with {got[0]}, the manifest says ({size}, {checksum})")
    return size
