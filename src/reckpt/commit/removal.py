"""Deleting and replacing checkpoints, and cleaning up after crashed saves.

Every path here deletes or replaces only what reckpt wrote (:mod:`reckpt.ownership`).

**Ownership** (:mod:`reckpt.ownership`): deleting or replacing a checkpoint removes only
the entries reckpt wrote. A checkpoint folder that also holds foreign entries is deleted
member by member under the deletion marker (the folder and the foreign entries stay), and
replaced on POSIX by the directory swap followed by moving the foreign entries from the
old folder (now trash) into the new one: :func:`replace_checkpoint_dir`. The old folder
carries a replace record (``.reckpt-replace.json``) naming its writer and target, so that a
cleanup after a crash at any step finishes the job instead of deleting the trash: it puts
the old checkpoint back when the new one never arrived, and otherwise returns the foreign
entries first. A trash folder is deleted only once it holds nothing foreign.

Stale staging left by a crash is removed by a later save, but only when its owner
record shows a dead process (same host) or a heartbeat older than ``stale_after_s``, or
when it has no owner record and no file (or, on local disk, only files older than
``stale_after_s``). Temporary files of atomic replaces of reckpt's files whose writer pid
is dead go too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time

from reckpt.commit.state import (
    STALE_AFTER_S,
    OwnerRecord,
    checkpoint_state,
    is_stale,
    new_token,
    pid_alive,
    read_owner,
)
from reckpt.naming import (
    DELETING_MARKER,
    IN_PROGRESS_MARKER,
    MANIFEST_FILE,
    OWNER_FILE,
    REPLACE_RECORD,
    basename,
    is_staging,
    is_trash,
    parse_any_step,
    trash_name,
)
from reckpt.ownership import foreign_names, is_owned, manifest_members, temp_writer_pid
from reckpt.storage.core import Storage
from reckpt.storage.hooks import fault_point

__all__ = ["recorded_members", "remove_checkpoint_dir", "replace_checkpoint_dir", "cleanup_stale"]

logger = logging.getLogger(__name__)


def recorded_members(storage: Storage, path: str) -> set[str]:
    """Top-level names that the checkpoint's manifest and markers record as reckpt's.

    Reads the manifest leniently (a damaged one records nothing: its extra-state folders
    then count as foreign and are kept, the safe side) and the members listed by an
    in-progress, deletion or replace record.
    """
    members: set[str] = set()
    with contextlib.suppress(OSError, ValueError, UnicodeDecodeError):
        doc = json.loads(storage.read_bytes(Storage.join(path, MANIFEST_FILE)).decode("utf-8"))
        if isinstance(doc, dict):
            members |= manifest_members(str(p) for p in doc.get("files") or {})
            members |= {str(p) for p in doc.get("entries") or {}}
    for record in (IN_PROGRESS_MARKER, DELETING_MARKER, REPLACE_RECORD):
        with contextlib.suppress(OSError, ValueError, UnicodeDecodeError, AttributeError):
            doc = json.loads(storage.read_bytes(Storage.join(path, record)).decode("utf-8"))
            members |= {str(m) for m in doc.get("members") or ()}
    return members


def remove_checkpoint_dir(storage: Storage, path: str) -> None:
    """Delete a checkpoint's own entries so that no intermediate state looks committed (rank 0 only).

    Foreign entries (:mod:`reckpt.ownership`) stay, and so does the folder holding them.
    POSIX, nothing foreign: rename to a trash name (atomic), then delete. Otherwise: write
    the deletion marker (listing the members, so an interrupted deletion can be finished
    without its manifest), delete the manifest, the other owned entries, the marker last.
    """
    names = storage.ls(path)
    members = recorded_members(storage, path)
    keep = foreign_names(names, members)
    if storage.atomic_rename and not keep:
        trash = Storage.join(Storage.parent(path), trash_name(new_token()))
        storage.rename(path, trash)
        storage.fsync_dir(Storage.parent(path))
        fault_point("delete_renamed")
        storage.rm(trash, recursive=True)
        return
    marker = Storage.join(path, DELETING_MARKER)
    owned = sorted(set(names) - set(keep) | members)
    storage.write_bytes(marker, json.dumps({"members": owned}).encode("utf-8"))
    fault_point("delete_marked")
    storage.rm(Storage.join(path, MANIFEST_FILE))
    fault_point("delete_unmanifested")
    for name in names:
        if name not in keep and name not in (DELETING_MARKER, MANIFEST_FILE):
            storage.rm(Storage.join(path, name), recursive=True)
    storage.rm(marker)
    if not keep:
        storage.rm(path, recursive=True)
    elif not storage.atomic_rename:
        logger.info("%s: kept %d entries reckpt did not write: %s", path, len(keep), keep)


def replace_checkpoint_dir(storage: Storage, target: str, work: str, token: str) -> None:
    """Swap a finished staging directory in for an existing ``target`` (rank 0, POSIX only).

    Readers see the old complete checkpoint or the new one (the directory rename is
    atomic); foreign entries of the old folder are moved into the new one afterwards, so
    they survive byte for byte. A crash at any step is finished by :func:`cleanup_stale`
    (see the module docstring).
    """
    parent = Storage.parent(target)
    trash = Storage.join(parent, trash_name(token))
    record = OwnerRecord.mine(token, target, time.time())
    storage.write_bytes(Storage.join(target, REPLACE_RECORD), record.to_json())
    fault_point("replace_recorded")
    storage.rename(target, trash)
    fault_point("replace_moved_aside")
    try:
        storage.rename(work, target)
    except BaseException:
        with contextlib.suppress(OSError):  # put the old checkpoint back
            storage.rename(trash, target)
            storage.rm(Storage.join(target, REPLACE_RECORD))
        raise
    storage.fsync_dir(parent)
    fault_point("replace_swapped")
    if _return_foreign(storage, trash, target):
        storage.rm(trash, recursive=True)


def _return_foreign(storage: Storage, trash: str, target: str) -> bool:
    """Move the foreign entries of a replaced checkpoint's trash into ``target``.

    Returns whether the trash now holds only reckpt's entries (safe to delete).
    """
    stuck = []
    for name in foreign_names(storage.ls(trash), recorded_members(storage, trash)):
        if storage.exists(Storage.join(target, name)):
            stuck.append(name)  # cannot happen unless someone wrote it meanwhile
            continue
        storage.rename(Storage.join(trash, name), Storage.join(target, name))
        fault_point("foreign_returned")
    storage.fsync_dir(target)
    if stuck:
        logger.warning(
            "%s: %s could not be moved back into %s (the name is taken there); they stay in %s",
            trash,
            stuck,
            target,
            trash,
        )
    return not stuck


def _finish_trash(storage: Storage, model_dir: str, path: str, now: float, stale_after_s: float) -> bool:
    """Handle a trash directory found by cleanup; returns whether it was deleted.

    Without a replace record it is a deletion's: all reckpt's, deleted. With one, its
    writer must be gone; then the old checkpoint goes back when the new one never arrived,
    else the foreign entries go to the new one and the rest is deleted.
    """
    record = read_owner(storage, Storage.join(path, REPLACE_RECORD))
    if record is None:
        if storage.exists(Storage.join(path, REPLACE_RECORD)):
            return False  # unreadable record: keep, it may hold foreign entries
        storage.rm(path, recursive=True)
        return True
    if not is_stale(
        record, now=now, host=socket.gethostname(), pid_alive=pid_alive, stale_after_s=stale_after_s
    ):
        return False
    target = Storage.join(model_dir, basename(record.target))
    if not storage.exists(target):
        storage.rename(path, target)
        storage.rm(Storage.join(target, REPLACE_RECORD))
        storage.fsync_dir(model_dir)
        logger.warning("%s: a crashed save was replacing it; the previous checkpoint was put back", target)
        return False
    if _return_foreign(storage, path, target):
        storage.rm(path, recursive=True)
        return True
    return False


def cleanup_stale(
    storage: Storage, model_dir: str, *, now: float | None = None, stale_after_s: float = STALE_AFTER_S
) -> list[str]:
    """Remove debris of crashed saves in ``model_dir`` (rank 0 only); returns what was removed.

    Only reckpt's own debris goes: trash directories (after the foreign entries of a
    replaced checkpoint are returned, see :func:`_finish_trash`), staging directories whose
    owner is stale, interrupted deletions (their owned entries), and (object stores) the
    owned entries of ``model.ckpt-*`` directories that still carry a stale in-progress
    marker. A folder is never removed merely because it is incomplete, and a staging area
    whose owner is alive is never touched.
    """
    now = time.time() if now is None else now
    host = socket.gethostname()
    removed = []
    for name in storage.ls(model_dir):
        path = Storage.join(model_dir, name)
        if is_trash(name):
            if _finish_trash(storage, model_dir, path, now, stale_after_s):
                removed.append(path)
            continue
        if parse_any_step(name) is not None and storage.exists(Storage.join(path, DELETING_MARKER)):
            remove_checkpoint_dir(storage, path)  # an interrupted deletion: finish it
            removed.append(path)
            continue
        if parse_any_step(name) is not None:
            replacing = read_owner(storage, Storage.join(path, REPLACE_RECORD))
            if replacing is not None and is_stale(
                replacing, now=now, host=host, pid_alive=pid_alive, stale_after_s=stale_after_s
            ):  # a replace killed before it moved this folder aside: the folder stays as it is
                storage.rm(Storage.join(path, REPLACE_RECORD))
                removed.append(Storage.join(path, REPLACE_RECORD))
        if is_staging(name):
            record = Storage.join(path, OWNER_FILE)
        elif parse_any_step(name) is not None and checkpoint_state(storage, path) == "incomplete":
            record = Storage.join(path, IN_PROGRESS_MARKER)
        else:
            continue
        owner = read_owner(storage, record)
        if owner is None:
            # No readable record: the writer died before writing it, or is writing it right
            # now. Only an empty staging area, or one whose files are all old, is removed.
            if is_staging(name) and _ownerless_is_debris(storage, path, now, stale_after_s):
                storage.rm(path, recursive=True)
                removed.append(path)
            continue
        if is_stale(owner, now=now, host=host, pid_alive=pid_alive, stale_after_s=stale_after_s):
            if is_staging(name):
                storage.rm(path, recursive=True)
            else:
                remove_checkpoint_dir(storage, path)
            removed.append(path)
    if storage.local:
        removed += _remove_dead_temp_files(storage, model_dir)
    return removed


def _ownerless_is_debris(storage: Storage, path: str, now: float, stale_after_s: float) -> bool:
    files = storage.walk_files(path)
    if not files:
        return True
    if not storage.local:
        return False
    newest = max(os.path.getmtime(storage._local(Storage.join(path, rel))) for rel in files)
    return now - newest > stale_after_s


def _remove_dead_temp_files(storage: Storage, model_dir: str) -> list[str]:
    """Temporary files of atomic replaces of reckpt's files (``<name>.tmp-<pid>-<hex>``) whose writer is dead.

    Only on local disk, where the pid names a process of this host, and only temporaries
    of names reckpt owns (sidecars ...): a user's file that merely looks like one stays.
    """
    removed = []
    for name in storage.ls(model_dir):
        if parse_any_step(name) is None:
            continue
        ckpt = Storage.join(model_dir, name)
        for entry in storage.ls(ckpt):
            pid = temp_writer_pid(entry)
            if pid is not None and is_owned(entry) and not pid_alive(pid):
                storage.rm(Storage.join(ckpt, entry))
                removed.append(Storage.join(ckpt, entry))
    return removed
