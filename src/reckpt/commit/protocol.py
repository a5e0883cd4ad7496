"""One save's commit protocol, rank 0's side: prepare the target, then commit or abort.

:class:`SaveCommit` is the only writer of the states :func:`reckpt.commit.state.checkpoint_state`
reads (the one commit predicate): nothing is visible before :meth:`SaveCommit.commit`, and
:meth:`SaveCommit.abort` never touches a committed checkpoint.

- **POSIX** (atomic rename): :meth:`~SaveCommit.prepare` creates the staging sibling
  ``.reckpt-staging.<token>`` holding the owner record; every rank writes into it;
  :meth:`~SaveCommit.commit` writes the manifest, fsyncs, and renames the staging directory
  onto the target (swapping out an old checkpoint with :func:`~reckpt.commit.removal.replace_checkpoint_dir`).
- **Object stores**: :meth:`~SaveCommit.prepare` writes the in-progress marker (holding the
  owner record) into the target itself, after removing an old checkpoint there;
  :meth:`~SaveCommit.commit` writes the manifest last and then removes the marker.

While a save is under way its owner record is rewritten every few seconds (a heartbeat), so
that a concurrent cleanup (:func:`~reckpt.commit.removal.cleanup_stale`) tells a live save
from the debris of a dead one. Leaving the ``with`` block stops the heartbeat.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Collection

from reckpt.commit.removal import (
    cleanup_stale,
    recorded_members,
    remove_checkpoint_dir,
    replace_checkpoint_dir,
)
from reckpt.commit.state import OwnerRecord, checkpoint_state, heartbeat
from reckpt.errors import ConfigError, StepAlreadyExistsError
from reckpt.naming import IN_PROGRESS_MARKER, MANIFEST_FILE, OWNER_FILE, parse_any_step, staging_name
from reckpt.ownership import EVAL_RESULT_NAMES, MEMBER_NAMES, foreign_names
from reckpt.storage.core import Storage
from reckpt.storage.hooks import fault_point

__all__ = ["SaveCommit"]

logger = logging.getLogger(__name__)


class SaveCommit:
    """Rank 0's side of one save into ``target``: :meth:`prepare`, then :meth:`commit` or :meth:`abort`.

    Only the coordinating rank calls these methods; the other ranks learn the work
    directory from it (a broadcast) and write their shards there. Use it as a context
    manager: leaving the block stops the owner record's heartbeat whatever happened.

    Args:
        storage: the target's storage.
        target: the checkpoint directory (``<model_dir>/model.ckpt-<step>`` or a delta).
        token: the save's random token (the same on every rank), naming the staging area.
        members: the top-level names the save writes (its parts), recorded in the owner
            record so that a cleanup after a crash knows what belonged to the save.

    Attributes:
        work: where every rank writes (the staging area, or the target on object stores);
            empty until :meth:`prepare`.
    """

    def __init__(self, storage: Storage, target: str, token: str, members: Collection[str]) -> None:
        self.storage = storage
        self.target = target
        self.token = token
        self.members = frozenset(members)
        self.work = ""
        self._heartbeat = contextlib.ExitStack()

    def __enter__(self) -> SaveCommit:
        return self

    def __exit__(self, *exc: object) -> None:
        self._heartbeat.close()

    def prepare(self, replaceable: Callable[[], bool]) -> str:
        """Check the target, clean debris, create the work directory and start the owner record.

        Args:
            replaceable: asked only when a committed checkpoint already holds the target:
                whether the save may replace it (``overwrite``, or a checkpoint marked damaged).

        Returns:
            The work directory (also kept as :attr:`work`).

        Raises:
            StepAlreadyExistsError: a committed checkpoint holds the target and may not be replaced.
            ConfigError: the target is a model_dir, or holds foreign entries the save would
                overwrite (nothing is written).
        """
        storage, target = self.storage, self.target
        state = checkpoint_state(storage, target)
        if state in ("committed", "legacy") and not replaceable():
            raise StepAlreadyExistsError(
                f"{target}: a committed checkpoint already exists; pass overwrite=True to replace it,"
                " or save under another step"
            )
        if state != "absent":
            self._check_target()
        parent = Storage.parent(target)
        storage.makedirs(parent)
        removed = cleanup_stale(storage, parent)
        if removed:
            logger.info("removed debris of crashed saves: %s", removed)
        if storage.atomic_rename:
            self.work = Storage.join(parent, staging_name(self.token))
            storage.makedirs(self.work)
        else:
            if state != "absent":  # object store: the old checkpoint's own entries go, marker first
                remove_checkpoint_dir(storage, target)
            storage.makedirs(target)
            self.work = target
        record = OWNER_FILE if storage.atomic_rename else IN_PROGRESS_MARKER
        owner = OwnerRecord.mine(self.token, target, time.time(), self.members | MEMBER_NAMES)
        self._heartbeat.enter_context(heartbeat(storage, Storage.join(self.work, record), owner.render))
        return self.work

    def _check_target(self) -> None:
        """Refuse a target that is a model_dir or whose foreign entries the save would overwrite.

        Runs before anything is written. Foreign entries (:mod:`reckpt.ownership`) are otherwise
        left alone by the save.
        """
        storage, target = self.storage, self.target
        names = storage.ls(target)
        if not names:
            return
        held = [
            n
            for n in names
            if parse_any_step(n) is not None
            and checkpoint_state(storage, Storage.join(target, n)) in ("committed", "legacy")
        ]
        held += [n for n in names if n in EVAL_RESULT_NAMES]
        if held:
            shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
            raise ConfigError(
                f"{target} is a model_dir (it holds {shown}), not a checkpoint folder: saving there would"
                f" replace a run's root. Save into {Storage.join(target, 'model.ckpt-<step>')} instead;"
                " nothing was written"
            )
        clash = sorted(set(foreign_names(names, recorded_members(storage, target))) & self.members)
        if clash:
            raise ConfigError(
                f"{target}: {clash} already exist there and were not written by reckpt; this save would"
                " replace them with its own state of that name. Move them away or rename the extra"
                " state; nothing was written"
            )

    def commit(self, manifest: bytes) -> None:
        """Write the manifest (``manifest``: its JSON) last and make the checkpoint visible.

        Stops the heartbeat first: the owner record goes away with the commit.
        """
        self._heartbeat.close()
        storage, target, work = self.storage, self.target, self.work
        manifest_path = Storage.join(work, MANIFEST_FILE)
        if not storage.atomic_rename:
            storage.write_bytes(manifest_path, manifest)
            fault_point("after_manifest")
            storage.rm(Storage.join(work, IN_PROGRESS_MARKER))
            return
        # The owner record stays until after the rename, so that a concurrent cleanup
        # never mistakes this finished-but-not-yet-renamed staging area for debris.
        storage.write_bytes(manifest_path, manifest)
        fault_point("after_manifest")
        for sub in storage.ls(work):
            if storage.isdir(Storage.join(work, sub)):
                storage.fsync_dir(Storage.join(work, sub))
        storage.fsync_dir(work)
        if storage.exists(target):  # overwrite=True, or a folder holding other files
            replace_checkpoint_dir(storage, target, work, self.token)
        else:
            storage.rename(work, target)
            storage.fsync_dir(Storage.parent(target))
        # Committed: the owner record is not part of the manifest's file set, and failing to
        # remove it must not turn a committed save into an error.
        with contextlib.suppress(OSError):
            storage.rm(Storage.join(target, OWNER_FILE))

    def abort(self) -> None:
        """Remove what the failed save wrote (best effort); never touches a committed checkpoint."""
        self._heartbeat.close()
        with contextlib.suppress(Exception):
            if self.storage.atomic_rename:
                self.storage.rm(self.work, recursive=True)
            elif checkpoint_state(self.storage, self.target) == "incomplete":
                remove_checkpoint_dir(self.storage, self.target)
