"""A manager's tiers (``CheckpointManager(tiers=...)``): where saves go, the persister, retention, restart.

:class:`Tiered` is the part of :class:`reckpt.CheckpointManager` that knows about tiers
(:mod:`reckpt.tiers`). A save goes to the fastest tier due at its step, through the one save
path (:func:`reckpt.save.engine.save_checkpoint`) and, when asynchronous, through the
manager's own :class:`~reckpt.save.async_saver.AsyncSaver`: the caller blocks for the host
snapshot alone. On several nodes every node's part of the save is committed in its own
folder (:func:`reckpt.tiers.nodes.complete_node_parts`). When slower tiers are due too, the
lowest rank of each node queues a request for its node's persister *before* the save, and
waits first only if the previous request is still pending. Each tier is pruned by its own
``keep`` right after a save committed (by the policies of :mod:`reckpt.policy`, deleting with
:func:`~reckpt.commit.removal.remove_checkpoint_dir`: only what reckpt wrote), never a step
still to be promoted nor a leased one: the lowest rank of each node prunes the node's tiers,
rank 0 the shared ones. Debris of crashed saves is cleaned in the tier just saved to, where
no other save can be under way; the persister's own saves clean the slower tiers.

A restart (:meth:`Tiered.restore_latest`) lists every rank's copies, agrees on the newest step
every rank holds complete (:func:`reckpt.tiers.select.agree`), and restores each rank from its
fastest copy; the result says which tier every rank read.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reckpt.best import BestRule
from reckpt.commit.leases import active_leases
from reckpt.commit.removal import cleanup_stale, remove_checkpoint_dir
from reckpt.dist import Dist
from reckpt.errors import ConfigError, IntegrityError, UnsafeCheckpointError
from reckpt.format.manifest import read_manifest
from reckpt.lifecycle.discovery import checkpoints_in
from reckpt.lifecycle.resume import ResumeInfo
from reckpt.policy import LatestN, steps_to_delete
from reckpt.save.async_saver import AsyncSaver
from reckpt.save.contents import CheckpointWrite, SaveContents
from reckpt.save.engine import save_checkpoint
from reckpt.save.pipeline import write_checkpoint
from reckpt.storage.core import Storage, storage_for
from reckpt.tiers.config import Tier, TierSet
from reckpt.tiers.control import Control, Request
from reckpt.tiers.fill import part_sources, run_fills
from reckpt.tiers.nodes import NodeLayout, WorkRecorder, complete_node_parts, node_layout
from reckpt.tiers.select import Plan, agree, list_copies, newest_steps

__all__ = ["Tiered", "TieredResumeInfo"]

logger = logging.getLogger(__name__)

# A metric no run records: a tier without keep_best protects no best checkpoint.
_NO_BEST = BestRule(metric="\x00no best on this tier")


@dataclass(frozen=True, slots=True)
class TieredResumeInfo(ResumeInfo):
    """:class:`~reckpt.lifecycle.resume.ResumeInfo` of a tiered restart.

    Attributes:
        tier: the tier this rank read.
        sources: the tier every rank read, by rank.
        parts: each part of the checkpoint (``model``, ``optimizer`` ...) -> where the bytes of
            its files that this rank's node read came from -> bytes: the tier read, or what
            completed the node's part first (``node 1 memory``: another node's shared memory,
            over the process group; a shared tier's name: downloaded from it).
    """

    tier: str = ""
    sources: tuple[str, ...] = ()
    parts: Mapping[str, Mapping[str, int]] = dataclasses.field(default_factory=dict)


class Tiered:
    """A manager's tiers (see the module doc). The constructor does no I/O.

    Args:
        tiers: the tiers, fastest first.
        saver: the manager's async saver (its host copy and gloo group are shared).
        process_group: the training process group.
        eval_result_filename: the results file whose metrics tell a tier's best.
        best: how the best checkpoint is told (tiers with ``keep_best``).
        share_timeout_s: how long a persister waits for the other nodes' files of a shared copy.
        on_commit: called on every rank after a save committed, with its path, the time the
            caller blocked, the total time, whether it was asynchronous, the tier's name and
            its storage (the manager records it for :meth:`Background.take_saves`).
    """

    def __init__(
        self,
        tiers: Sequence[Tier] | TierSet,
        saver: AsyncSaver,
        process_group: Any,
        eval_result_filename: str,
        best: BestRule,
        share_timeout_s: float = 900.0,
        on_commit: Callable[[str, float, float, bool, str, Storage], None] | None = None,
    ) -> None:
        self.tiers = tiers if isinstance(tiers, TierSet) else TierSet(tiers)
        self.saver = saver
        self.pg = process_group
        self.eval_result_filename = eval_result_filename
        self.best = best
        self.share_timeout_s = share_timeout_s
        self.on_commit = on_commit
        self.storages = [storage_for(t.url, t.storage_options) for t in self.tiers]
        self.control = Control(self.tiers.control_dir) if len(self.tiers) > 1 else None
        self.layout: NodeLayout | None = None
        self._attached = False
        self._last: tuple[int, str] | None = None  # (step, tier) of the last save
        self.waited_s = 0.0  # time the last save waited for the persister

    # -- setup ---------------------------------------------------------------------------
    def _attach(self, persister: bool = True) -> NodeLayout:
        """Collective on first use: the node layout; each node's lowest rank starts its persister.

        A restart needs the layout alone (``persister=False``): the persister starts with the
        first save, or runs still from before.
        """
        d = Dist(self.pg)
        if self.layout is None:
            self.layout = node_layout(d)
        if persister and not self._attached:
            err: BaseException | None = None
            try:
                if self.layout.nodes > 1 and not any(t.is_shared for t in self.tiers):
                    raise ConfigError(
                        "tiers: a run on several nodes needs a shared tier (a URL such as s3://, or a"
                        " folder every node sees, with shared=True) to restart from"
                    )
                if self.layout.leader and self.control is not None:
                    self.control.write_config(
                        {
                            "tiers": self.tiers.to_json(),
                            "node": self.layout.node,
                            "nodes": self.layout.nodes,
                            "share_timeout_s": self.share_timeout_s,
                        }
                    )
                    self.control.register_trainer()
                    self.control.start_persister()
            except Exception as e:
                err = e
            d.raise_if_any(err, "starting the tiers' persister")
            self._attached = True
        return self.layout

    def _storage(self, tier: Tier) -> Storage:
        return self.storages[self.tiers.index(tier.name)]

    # -- save ----------------------------------------------------------------------------
    def save(
        self,
        step: int,
        model: Any,
        optimizer: Any,
        dense_ema: Any,
        extras: Mapping[str, Any],
        dataloader_state: Mapping[str, Any] | None,
        user_metadata: Mapping[str, Any] | None,
        run_async: bool,
        promote_all: bool,
        start: float,
    ) -> str:
        """Collective: save ``step`` into the fastest due tier; queue its promotion; the path.

        The arguments are :meth:`reckpt.CheckpointManager.save`'s (``extras``: the manager's
        extra states; ``promote_all``: copy to every slower tier; ``start``: when the save
        began). The lowest rank of each node waits first while an earlier promotion is pending
        (so at most one runs behind the training), then queues this one.
        """
        del start  # the caller's clock: the timings of a tier save are logged by the engine
        layout = self._attach()
        route = self.tiers.route(step, promote_all)
        request = None
        if route.promote and self.control is not None:
            targets = tuple(t.name for t in route.promote)
            request = Request(step, route.save.name, targets, time.time(), pid=os.getpid())
            self._queue(layout, request)
        path = route.save.checkpoint_dir(step)
        save_checkpoint(
            self._storage(route.save),
            path,
            model,
            optimizer,
            dense_ema,
            extra_states=extras,
            dataloader_state=dataloader_state,
            user_metadata=user_metadata,
            overwrite=True,  # a step of an abandoned timeline (before a resume) is replaced
            process_group=self.pg,
            write=self._writer(step, route.save, route.promote, request, run_async),
        )
        self._last = (step, route.save.name)
        return path

    def _queue(self, layout: NodeLayout, request: Request) -> None:
        err: BaseException | None = None
        if layout.leader and self.control is not None:
            try:
                began = time.monotonic()
                self.control.wait_idle()  # restarts a persister that died
                self.waited_s = time.monotonic() - began
                if self.waited_s > 0.01:
                    logger.info(
                        "step %d waited %.2fs for the previous promotion", request.step, self.waited_s
                    )
                self.control.add(request)
            except Exception as e:
                err = e
        Dist(self.pg).raise_if_any(err, f"queueing the promotion of step {request.step}")

    def _writer(
        self, step: int, tier: Tier, promote: Sequence[Tier], request: Request | None, run_async: bool
    ) -> CheckpointWrite:
        """The ``write`` of :func:`save_checkpoint`: the engine, then every node's part (or later)."""
        layout, control = self.layout, self.control
        assert layout is not None

        def write(
            storage: Storage,
            target: str,
            contents: SaveContents,
            *,
            overwrite: bool,
            process_group: Any,
            thread_count: int | None,
        ) -> None:
            began = time.time()
            recorder = WorkRecorder()
            contents = dataclasses.replace(contents, file_writers=(*contents.file_writers, recorder))
            group, snapshot = process_group, None
            if run_async:
                d = Dist(self.pg)
                group = self.saver.group(d.active)
                staged, snapshot = self.saver.freeze(contents.parts, d.is_coordinator, storage)
                contents = dataclasses.replace(contents, parts=staged)
            stall = time.time() - began

            def job() -> None:
                try:
                    write_checkpoint(
                        storage,
                        target,
                        contents,
                        overwrite=overwrite,
                        process_group=group,
                        thread_count=thread_count,
                        snapshot=snapshot,
                    )
                    if not tier.is_shared:
                        complete_node_parts(Dist(group), layout, storage, target, recorder.work)
                except BaseException:
                    if request is not None and control is not None and layout.leader:
                        control.remove(step)  # the save failed: nothing to promote
                    raise
                if self.on_commit is not None:
                    total = time.time() - began
                    blocked = stall if run_async else total
                    self.on_commit(target, blocked, total, run_async, tier.name, storage)
                self._prune([tier, *promote], cleanup=tier)

            if run_async:
                self.saver.submit(step, job)
            else:
                job()

        return write

    def promote_existing(self, step: int) -> None:
        """Collective: the final save fell on the step just saved: copy it to every slower tier."""
        if self._last is None or self._last[0] != step or self.control is None:
            return
        source = self._last[1]
        targets = tuple(t.name for t in self.tiers.tiers[self.tiers.index(source) + 1 :])
        if targets:
            self._queue(self._attach(), Request(step, source, targets, time.time(), pid=os.getpid()))

    # -- retention -----------------------------------------------------------------------
    def _prune(self, tiers: Sequence[Tier], cleanup: Tier | None = None) -> None:
        """Delete what each tier's ``keep`` does not keep, on the tiers this rank prunes.

        The lowest rank of each node prunes the node's tiers, rank 0 the shared ones. Only
        ``cleanup`` (the tier just saved to) also loses the debris of crashed saves. A failure
        is logged: retention never fails a save.
        """
        layout = self.layout
        if layout is None:
            return
        for tier in tiers:
            if not (layout.rank == 0 if tier.is_shared else layout.leader) or tier.keep == 0:
                continue
            storage, now = self._storage(tier), time.time()
            try:
                infos = checkpoints_in(
                    storage, tier.url, eval_result_filename=self.eval_result_filename, with_size=False
                )
                keep = self._protected(tier.name) | set(active_leases(storage, tier.url, now))
                best = self.best if tier.keep_best else _NO_BEST
                for step in reversed(
                    steps_to_delete(infos, [LatestN(tier.keep)], now=now, protected=keep, best=best)
                ):
                    remove_checkpoint_dir(storage, tier.checkpoint_dir(step))
                    logger.info("tier %s: pruned step %d", tier.name, step)
                if tier is cleanup:
                    cleanup_stale(storage, tier.url)
            except Exception as e:
                logger.warning("pruning tier %s (%s) failed: %s", tier.name, tier.url, e)

    def _protected(self, tier: str) -> set[int]:
        """Steps a prune pass of ``tier`` must keep: those still to be copied to a slower tier."""
        return set() if self.control is None else self.control.pending_sources(tier)

    # -- restart -------------------------------------------------------------------------
    def restore_latest(
        self, restore: Callable[[str, Mapping[str, Any]], ResumeInfo]
    ) -> TieredResumeInfo | None:
        """Collective: resume from the newest step every node can restore, each from its fastest copy.

        ``restore(path, storage_options)`` restores one checkpoint (collective). Every rank lists
        its tiers, the ranks agree on a plan (:func:`reckpt.tiers.select.agree`), the nodes fill
        their parts where the plan says so (:func:`reckpt.tiers.fill.run_fills`), and each rank
        restores its node's copy. A copy that fails verification is left out (with the parts
        of its step, when they were filled) and the plan is made again: another copy of the
        same step, or an older step. ``None`` when no step can be restored everywhere.

        Raises:
            IntegrityError: every candidate failed (the first failure).
        """
        self.saver.wait()
        layout = self._attach(persister=False)
        d = Dist(self.pg)
        shared = [t.is_shared for t in self.tiers]
        # The shared tiers are slow to list: first by name, read only when they may hold newer.
        node_tiers = [i for i, is_shared in enumerate(shared) if not is_shared]
        mine = list_copies(self.tiers, self.storages, node_tiers)
        newest_shared = max(
            d.all_gather(newest_steps(self.tiers, self.storages, set(range(len(shared))) - set(node_tiers)))
        )
        first: Exception | None = None
        while True:
            chosen = agree(d, mine, layout.ranks, shared)
            if newest_shared >= 0 and (chosen is None or chosen.step < newest_shared):
                more = list_copies(self.tiers, self.storages, [i for i in range(len(shared)) if shared[i]])
                for step, copies in more.items():
                    mine.setdefault(step, []).extend(copies)
                newest_shared = -1
                continue
            if chosen is None:
                break
            index = chosen.tiers[d.rank]
            tier = self.tiers.tiers[index]
            path = tier.checkpoint_dir(chosen.step)
            try:
                received = run_fills(d, layout, chosen, self.tiers, self.storages)
                info = restore(path, tier.storage_options)
            except (IntegrityError, UnsafeCheckpointError) as e:
                logger.warning(
                    "resume: step %d from %s failed, planning again without it: %s", chosen.step, path, e
                )
                drop_parts = bool(chosen.fills)
                mine[chosen.step] = [
                    c
                    for c in mine[chosen.step]
                    if c.tier != index and not (drop_parts and not shared[c.tier])
                ]
                first = first or e
                continue
            sources = tuple(self.tiers.tiers[i].name for i in chosen.tiers)
            parts = self._part_sources(chosen, layout, tier, path)
            logger.info(
                "resumed step %d from %s (%d bytes filled first): %s", chosen.step, tier.name, received, parts
            )
            self._last = (chosen.step, tier.name)
            fields = {f.name: getattr(info, f.name) for f in dataclasses.fields(ResumeInfo)}
            return TieredResumeInfo(**fields, tier=tier.name, sources=sources, parts=parts)
        if first is not None:
            raise first
        return None

    def _part_sources(
        self, chosen: Plan, layout: NodeLayout, tier: Tier, path: str
    ) -> dict[str, dict[str, int]]:
        """Part -> where this node's bytes of it came from -> bytes (see :func:`part_sources`)."""
        manifest = read_manifest(self._storage(tier), path)
        sizes = {} if manifest is None else {rel: rec.size for rel, rec in manifest.files.items()}
        return part_sources(sizes, chosen, layout.node, [t.name for t in self.tiers], tier.name)

    def latest(self) -> tuple[str | None, int]:
        """This rank's newest complete copy: ``(path, step)``, ``(None, -1)`` when none."""
        copies = list_copies(self.tiers, self.storages)
        complete = {
            s: min(c.tier for c in cs if c.complete)
            for s, cs in copies.items()
            if any(c.complete for c in cs)
        }
        if not complete:
            return None, -1
        step = max(complete)
        return self.tiers.tiers[complete[step]].checkpoint_dir(step), step

    # -- closing -------------------------------------------------------------------------
    def close(self, drain: bool = True) -> None:
        """Wait until this node's promotions are done (``drain``), let the persister exit, prune.

        Call after the last save committed. The persister finishes what is queued in any case;
        ``drain`` only makes this call wait for it.
        """
        try:
            if self._attached and self.control is not None and self.layout is not None and self.layout.leader:
                if drain:
                    self.control.wait_idle()
                self.control.trainer_closed()
        finally:
            self._attached = False
        if drain:
            self._prune(list(self.tiers))
