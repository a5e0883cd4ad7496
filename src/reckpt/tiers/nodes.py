"""Nodes: which ranks share a machine, and each node's part of a checkpoint on a node-scoped tier.

A node-scoped tier (shared memory, a local disk) is a different folder on every node, under
the same path. A save into it runs as any save: rank 0 prepares the staging directory and
every rank writes its shards under the path rank 0 chose, which on every other node is a
folder of that node. Rank 0 commits its node's folder; :func:`complete_node_parts` then
commits every other node's: rank 0 sends the manifest and the files it writes for every rank
(:func:`reckpt.tiers.promote.is_shared_file`), and the lowest rank of each node writes them
into its node's staging directory and commits it with the same protocol
(:class:`reckpt.commit.protocol.SaveCommit`). Each node's folder then holds a committed
checkpoint whose manifest lists every rank's files and which holds its own ranks' files: a
*node part*. On one node the part is the whole checkpoint.

Nodes are told apart by host name and torchrun's ``GROUP_RANK`` (the node's rank), so that
several simulated nodes on one machine count as several.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from reckpt.commit.protocol import SaveCommit
from reckpt.dist import Dist
from reckpt.errors import ConfigError
from reckpt.format.integrity import FileRecord
from reckpt.format.manifest import Manifest
from reckpt.naming import MANIFEST_FILE, basename, is_staging
from reckpt.ownership import manifest_members
from reckpt.storage.core import Storage
from reckpt.tiers.promote import is_shared_file

__all__ = ["NodeLayout", "node_key", "layout_from_keys", "node_layout", "WorkRecorder", "complete_node_parts"]


@dataclass(frozen=True)
class NodeLayout:
    """Where this rank sits among the nodes.

    Attributes:
        node: this rank's node, 0 for the node of rank 0 (nodes are numbered by their lowest rank).
        ranks: the ranks of each node.
        rank: this rank.
    """

    node: int
    ranks: tuple[tuple[int, ...], ...]
    rank: int

    @property
    def nodes(self) -> int:
        return len(self.ranks)

    @property
    def leader(self) -> bool:
        """Whether this rank is its node's lowest (it runs the node's persister and commits)."""
        return self.ranks[self.node][0] == self.rank


def node_key() -> str:
    """What tells this process's node apart: host name and torchrun's ``GROUP_RANK``."""
    return f"{socket.gethostname()}/{os.environ.get('GROUP_RANK', '')}"


def layout_from_keys(keys: Sequence[str], rank: int) -> NodeLayout:
    """The layout from every rank's :func:`node_key` (pure).

    Example:
        >>> layout = layout_from_keys(["a", "a", "b", "b"], 2)
        >>> layout.node, layout.nodes, layout.leader, layout.ranks
        (1, 2, True, ((0, 1), (2, 3)))
    """
    order: list[str] = []
    for k in keys:
        if k not in order:
            order.append(k)
    ranks = tuple(tuple(r for r, k in enumerate(keys) if k == key) for key in order)
    return NodeLayout(order.index(keys[rank]), ranks, rank)


def node_layout(d: Dist) -> NodeLayout:
    """Collective: every rank's node key gathered; the same layout on every rank."""
    return layout_from_keys(d.all_gather(node_key()), d.rank)


class WorkRecorder:
    """A file writer that writes nothing and remembers the save's work directory on this rank."""

    def __init__(self) -> None:
        self.work: str | None = None

    def __call__(self, storage: Storage, work: str) -> dict[str, FileRecord]:
        self.work = work
        return {}


def complete_node_parts(d: Dist, layout: NodeLayout, storage: Storage, target: str, work: str | None) -> None:
    """Collective, after a save into a node-scoped tier: commit every node's part of it.

    Rank 0 reads the committed manifest and the shared files from its node's ``target`` and
    broadcasts them; the lowest rank of every other node writes them into ``work`` (its node's
    staging directory, as :class:`WorkRecorder` saw it) and commits. Every rank raises when
    any failed. Nothing to do on one node.
    """
    if layout.nodes == 1:
        return
    payload: dict[str, bytes] = {}
    err: BaseException | None = None
    if d.is_coordinator:
        try:
            data = storage.read_bytes(Storage.join(target, MANIFEST_FILE))
            manifest = Manifest.from_json(data, Storage.join(target, MANIFEST_FILE))
            payload = {
                rel: storage.read_bytes(Storage.join(target, rel))
                for rel in manifest.files
                if is_shared_file(rel)
            }
            payload[MANIFEST_FILE] = data
        except Exception as e:
            err = e
    d.raise_if_any(err, f"reading the shared files of {target}")
    payload = d.broadcast(payload)
    err = None
    if layout.leader and layout.node != 0:
        try:
            _commit_part(storage, target, work, payload)
        except Exception as e:
            err = e
    d.raise_if_any(err, f"committing the node parts of {target}")


def _commit_part(storage: Storage, target: str, work: str | None, payload: dict[str, bytes]) -> None:
    if work is None or not is_staging(basename(work)) or not storage.atomic_rename:
        raise ConfigError(f"{target}: a node-scoped tier must be a local folder (work directory {work!r})")
    files = dict(payload)
    manifest = files.pop(MANIFEST_FILE)
    members = manifest_members(Manifest.from_json(manifest, Storage.join(target, MANIFEST_FILE)).files)
    storage.makedirs(work)
    for rel, data in files.items():
        storage.write_bytes(Storage.join(work, rel), data)
    commit = SaveCommit(storage, target, basename(work).rsplit(".", 1)[-1], members)
    commit.work = work
    commit.commit(manifest)
