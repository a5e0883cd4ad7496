"""Restart: which step to resume, from which tier each rank reads it, and what is copied first.

Each rank lists the copies its tiers hold (:func:`list_copies`: committed, not marked
damaged, manifest intact; a copy lacking some of its manifest's files is a node's *part*, see
:mod:`reckpt.tiers.nodes`). The ranks gather their lists and each computes the same plan
(:func:`plan`, pure): the newest step that every node can restore, one and the same checkpoint
(one manifest) everywhere. A node restores from the fastest of:

- a complete copy it holds (shared memory, its disk, or the shared tier); or
- its fastest part, once *filled*: each missing file copied in from another node's part (over
  the process group, :mod:`reckpt.tiers.fill`) or, failing that, from a complete copy on a
  shared tier.

So one node may read shared memory while a replaced machine, holding nothing, reads the
durable store; and nodes killed together resume from their memory parts without the durable
copy. A step missing a file on every node and on every shared tier is not restorable, and an
older one is planned. Any chosen copy is complete when read, so a world-size change needs
nothing more (DCP reshards it). The data files' checksums are checked as the restore reads
them (and as fills copy them); a copy that fails is left out and the plan made again.
:func:`agree` is the collective wrapper.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from reckpt.commit.state import checkpoint_state
from reckpt.dist import Dist
from reckpt.errors import IntegrityError
from reckpt.format.damage import is_marked_damaged
from reckpt.format.integrity import checksum_bytes
from reckpt.format.manifest import Manifest
from reckpt.naming import MANIFEST_FILE, parse_step
from reckpt.storage.core import Storage
from reckpt.tiers.config import TierSet

__all__ = ["Copy", "Fill", "Plan", "list_copies", "newest_steps", "plan", "agree"]

logger = logging.getLogger(__name__)

SHARED = -1
"""The source "node" of a file filled from a shared tier rather than from another node."""


@dataclass(frozen=True)
class Copy:
    """One rank's view of one checkpoint on one tier.

    Attributes:
        tier: the tier's position, 0 for the fastest.
        manifest: the checksum of its manifest (two copies of one checkpoint share it).
        missing: the manifest's files it lacks (none: a complete copy).
    """

    tier: int
    manifest: str
    missing: frozenset[str] = field(default_factory=frozenset)

    @property
    def complete(self) -> bool:
        return not self.missing


@dataclass(frozen=True)
class Fill:
    """Files one node copies into its part of the chosen checkpoint before restoring it.

    Attributes:
        node: the node whose part is completed.
        tier: the tier of that part.
        files: ``(file, source node, source tier)``: another node's part, or a complete copy on
            a shared tier (source node :data:`SHARED`).
    """

    node: int
    tier: int
    files: tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class Plan:
    """The step to resume, each rank's tier (by rank), and the fills that come first."""

    step: int
    manifest: str
    tiers: tuple[int, ...]
    fills: tuple[Fill, ...] = ()


def newest_steps(tiers: TierSet, storages: Sequence[Storage], only: Collection[int]) -> int:
    """Local: the newest step named in the tiers ``only`` (by position), -1 for none; one listing each."""
    newest = -1
    for i in sorted(only):
        with contextlib.suppress(OSError):
            steps = (parse_step(n) for n in storages[i].ls(tiers.tiers[i].url))
            newest = max([newest, *(s for s in steps if s is not None)])
    return newest


def list_copies(
    tiers: TierSet, storages: Sequence[Storage], only: Collection[int] | None = None
) -> dict[int, list[Copy]]:
    """Local: the copies this rank's tiers (or those ``only``, by position) hold, by step.

    Committed checkpoints only, not marked damaged, whose manifest checks; a tier that
    cannot be listed counts as empty (with a warning).
    """
    out: dict[int, list[Copy]] = {}
    for i, (tier, storage) in enumerate(zip(tiers, storages, strict=True)):
        if only is not None and i not in only:
            continue
        try:
            names = storage.ls(tier.url)
        except OSError as e:
            logger.warning("tier %s (%s) cannot be listed, skipping it: %s", tier.name, tier.url, e)
            continue
        for name in names:
            step = parse_step(name)
            if step is None:
                continue
            path = Storage.join(tier.url, name)
            try:
                if checkpoint_state(storage, path) != "committed" or is_marked_damaged(storage, path):
                    continue
                data = storage.read_bytes(Storage.join(path, MANIFEST_FILE))
                manifest = Manifest.from_json(data, Storage.join(path, MANIFEST_FILE))
                missing = frozenset(manifest.files) - set(storage.walk_files(path))
            except (OSError, IntegrityError) as e:
                logger.warning("tier %s: skipping %s: %s", tier.name, path, e)
                continue
            out.setdefault(step, []).append(Copy(i, checksum_bytes(data), missing))
    return out


def _node_option(
    n: int, parts: Sequence[Sequence[Copy]], shared: Sequence[bool], shared_complete: int | None
) -> tuple[int, Fill | None] | None:
    """Node ``n``'s fastest way to a complete copy: ``(tier, fill or None)``; ``None``: none."""
    mine = parts[n]
    complete = [c.tier for c in mine if c.complete]
    best = (min(complete), None) if complete else None
    own = [c for c in mine if not c.complete and not shared[c.tier]]
    if own:
        part = min(own, key=lambda c: c.tier)
        if best is None or part.tier < best[0]:
            files = []
            for rel in sorted(part.missing):
                peer = next(
                    (
                        (m, min(c.tier for c in parts[m] if not shared[c.tier] and rel not in c.missing))
                        for m in range(len(parts))
                        if m != n and any(not shared[c.tier] and rel not in c.missing for c in parts[m])
                    ),
                    None,
                )
                if peer is None and shared_complete is None:
                    return best
                files.append((rel, *peer) if peer is not None else (rel, SHARED, shared_complete or 0))
            return part.tier, Fill(n, part.tier, tuple(files))
    return best


def plan(
    holdings: Sequence[Mapping[int, Sequence[Copy]]], ranks: Sequence[Sequence[int]], shared: Sequence[bool]
) -> Plan | None:
    """The newest step every node can restore, and how (pure; see the module doc).

    Args:
        holdings: rank ``r``'s :func:`list_copies` at ``r``.
        ranks: the ranks of each node (a node's lowest rank speaks for its node's tiers).
        shared: for each tier position, whether every node sees the same tier.

    Among several checkpoints of one step (saved again after a resume), the one read from the
    fastest tiers wins; a node reads its fastest complete copy unless filling a faster part
    makes one.

    Example:
        >>> shared = [False, False, True]  # memory, local disk, S3
        >>> lacks_a, lacks_b = frozenset({"a.distcp"}), frozenset({"b.distcp"})
        >>> a = {12: [Copy(0, "m12", lacks_b)], 8: [Copy(1, "m8", lacks_b), Copy(2, "m8")]}
        >>> b = {12: [Copy(0, "m12", lacks_a)], 8: [Copy(2, "m8")]}
        >>> p = plan([a, b], [[0], [1]], shared)  # both nodes alive: each fills from the other
        >>> p.step, p.tiers, [f.files for f in p.fills]
        (12, (0, 0), [(('b.distcp', 1, 0),), (('a.distcp', 0, 0),)])
        >>> p = plan([a, {8: [Copy(2, "m8")]}], [[0], [1]], shared)  # node 1 replaced: S3 only
        >>> p.step, p.tiers, p.fills
        (8, (1, 2), (Fill(node=0, tier=1, files=(('b.distcp', -1, 2),)),))
    """
    if not holdings or not ranks:
        return None
    for step in sorted({s for h in holdings for s in h}, reverse=True):
        best: tuple[int, str, tuple[int, ...], tuple[Fill, ...]] | None = None
        ids = sorted({c.manifest for h in holdings for c in h.get(step, ())})
        for mid in ids:
            parts = [[c for c in holdings[node[0]].get(step, ()) if c.manifest == mid] for node in ranks]
            full = [c.tier for p in parts for c in p if c.complete and shared[c.tier]]
            shared_complete = min(full) if full else None
            options = [_node_option(n, parts, shared, shared_complete) for n in range(len(ranks))]
            if any(o is None for o in options):
                continue
            per_rank = [0] * sum(len(r) for r in ranks)
            for node, option in zip(ranks, options, strict=True):
                for r in node:
                    per_rank[r] = option[0]  # type: ignore[index]
            fills = tuple(o[1] for o in options if o is not None and o[1] is not None)
            cost = sum(per_rank)
            if best is None or cost < best[0]:
                best = (cost, mid, tuple(per_rank), fills)
        if best is not None:
            return Plan(step, best[1], best[2], best[3])
    return None


def agree(
    d: Dist, mine: Mapping[int, Sequence[Copy]], ranks: Sequence[Sequence[int]], shared: Sequence[bool]
) -> Plan | None:
    """Collective: every rank's copies gathered, the same :func:`plan` on every rank."""
    return plan(d.all_gather({s: list(cs) for s, cs in mine.items()}), ranks, shared)
