"""Integrity verification: every file's size and checksum against the manifest."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from reckpt.commit.state import checkpoint_state
from reckpt.errors import (
    CheckpointNotFoundError,
    ConfigError,
    IncompleteCheckpointError,
    IntegrityError,
    UnsafeCheckpointError,
)
from reckpt.format.integrity import CHECKSUM_ALGORITHM, FileRecord, hash_stream
from reckpt.format.manifest import Manifest, chain_names, read_manifest, read_sidecar
from reckpt.naming import (
    DCP_METADATA_FILE,
    IN_PROGRESS_MARKER,
    MANIFEST_FILE,
    OWNER_FILE,
    SIDECAR_PREFIX,
    SIDECAR_SUFFIX,
    is_sidecar,
)
from reckpt.storage.core import Storage, storage_for

if TYPE_CHECKING:
    from reckpt.dist import Dist

logger = logging.getLogger(__name__)

CHECK_THREADS = 4
"""Files of a checkpoint checked at once (the parallel read's thread count)."""

__all__ = ["VerifyReport", "verify", "check_files", "check_sidecars", "check_storage_bounds"]


@dataclass(slots=True)
class VerifyReport:
    """Outcome of :func:`verify`.

    Attributes:
        checkpoint: the directory checked.
        state: its commit state (``committed``, ``legacy``, ``incomplete``).
        checked: files whose size and checksum were compared.
        problems: one message per bad file (missing, wrong size, wrong checksum).
        unexpected: files present but not listed in the manifest (not an error).
    """

    checkpoint: str
    state: str
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.state in ("committed", "legacy") and not self.problems


def record_problem(path: str, rec: FileRecord, size: int, checksum: str | None = None) -> str | None:
    """What is wrong with a file of ``size`` bytes (and ``checksum``, if read) against its record."""
    if size != rec.size:
        return f"{path}: size {size} bytes, the manifest says {rec.size} (truncated or appended)"
    if checksum is not None and checksum != rec.checksum:
        return f"{path}: checksum {checksum} differs from the manifest's {rec.checksum} (corrupted)"
    return None


def integrity_error(checkpoint_dir: str, problems: list[str], advice: str) -> IntegrityError:
    """The error a restore raises for damaged files, one line per problem, then ``advice``."""
    return IntegrityError(
        f"{checkpoint_dir}: integrity check failed ({len(problems)} file(s)):\n  "
        + "\n  ".join(problems)
        + "\n"
        + advice
    )


def check_files(
    storage: Storage,
    checkpoint_dir: str,
    manifest: Manifest,
    paths: list[str],
    sizes_only: Collection[str] = (),
) -> list[str]:
    """Check the listed files of a checkpoint; returns one message per problem.

    Files in ``sizes_only`` are only looked up (present, the manifest's size), not read.
    """
    if manifest.checksum_algorithm != CHECKSUM_ALGORITHM:
        return [f"{checkpoint_dir}: unknown checksum algorithm {manifest.checksum_algorithm!r}"]

    def check(rel: str) -> str | None:
        rec = manifest.files[rel]
        path = Storage.join(checkpoint_dir, rel)
        if not storage.exists(path):
            return f"{path}: missing (the manifest lists {rec.size} bytes)"
        if rel in sizes_only:
            return record_problem(path, rec, storage.size(path))
        with storage.open(path, "rb") as f:
            return record_problem(path, rec, *hash_stream(f))

    found = _side_by_side(check, paths)
    return [p for p in found if p is not None]


def _side_by_side(check: Callable[[str], str | None], paths: list[str]) -> list[str | None]:
    """``check`` of every path, up to :data:`CHECK_THREADS` at once (reads and XXH3 release the
    GIL), results in the order of ``paths``; a failure raises the first failing path's error.
    The caller's thread checks too, so where no thread can be started (Python 3.12.0-3.12.2
    at interpreter exit) it checks them all."""
    found: list[str | None] = [None] * len(paths)
    todo = iter(range(len(paths)))
    lock = threading.Lock()
    errors: dict[int, BaseException] = {}  # by position: the first failing path's is raised

    def work() -> None:
        while not errors:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                found[i] = check(paths[i])
            except BaseException as e:  # raised on the caller's thread below
                errors[i] = e

    started = []
    for n in range(min(CHECK_THREADS, len(paths)) - 1):
        thread = threading.Thread(target=work, name=f"reckpt-verify-{n}", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # no new threads: the caller's thread does the rest
            break
        started.append(thread)
    work()
    for thread in started:
        thread.join()
    if errors:
        raise errors[min(errors)]
    return found


def verify_collective(
    storage: Storage,
    checkpoint_dir: str,
    manifest: Manifest,
    d: Dist,
    files: list[str] | None = None,
    sizes_only: Collection[str] = (),
) -> int:
    """Collective: each rank checks a share of the files; all ranks raise on any problem.

    Args:
        files: the files to check (default: all of the manifest's), the same on every rank.
        sizes_only: files only looked up, not read (see :func:`check_files`).

    Returns:
        The number of files checked in all.
    """
    files = sorted(manifest.files) if files is None else files
    err: BaseException | None = None
    try:
        problems = check_files(storage, checkpoint_dir, manifest, files[d.rank :: d.world_size], sizes_only)
        if d.is_coordinator:
            for bad in check_sidecars(storage, checkpoint_dir):
                # Metrics and timings: worth a warning, not worth refusing the weights.
                logger.warning("%s (restoring the checkpoint's files anyway)", bad)
        if problems:
            advice = "Restore from another checkpoint; pass verify=False only to salvage data."
            err = integrity_error(checkpoint_dir, problems, advice)
    except OSError as e:
        err = e
    d.raise_if_any(err, f"verifying {checkpoint_dir}")
    return len(files)


def verify(checkpoint_dir: str, storage_options: Mapping[str, Any] | None = None) -> VerifyReport:
    """Re-check sizes and checksums of every file of a checkpoint (single process).

    Raises:
        CheckpointNotFoundError: nothing exists at ``checkpoint_dir``.

    Example:
        >>> # report = verify("run/model.ckpt-100"); assert report.ok, report.problems
    """
    storage = storage_for(checkpoint_dir, storage_options)
    state = checkpoint_state(storage, checkpoint_dir)
    if state == "absent":
        raise CheckpointNotFoundError(f"{checkpoint_dir}: no checkpoint here")
    report = VerifyReport(checkpoint_dir, state)
    if state == "incomplete":
        report.problems.append(f"{checkpoint_dir}: incomplete checkpoint (never committed)")
        return report
    try:
        manifest = read_manifest(storage, checkpoint_dir)
    except IntegrityError as e:
        report.problems.append(str(e))
        return report
    if manifest is None:  # legacy: nothing recorded to compare with
        return report
    report.problems.extend(check_files(storage, checkpoint_dir, manifest, sorted(manifest.files)))
    report.checked = len(manifest.files)
    if manifest.delta is not None:
        report.checked += _check_chain(storage, checkpoint_dir, manifest, report.problems)
    ignore = {MANIFEST_FILE, OWNER_FILE, IN_PROGRESS_MARKER}
    present = storage.walk_files(checkpoint_dir)
    report.problems.extend(check_sidecars(storage, checkpoint_dir, present))
    report.unexpected = [
        rel for rel in present if rel not in manifest.files and rel not in ignore and not is_sidecar(rel)
    ]
    return report


def _check_chain(storage: Storage, checkpoint_dir: str, manifest: Manifest, problems: list[str]) -> int:
    """A delta's links (base and earlier deltas): present, committed, intact; returns files checked."""
    root = Storage.parent(checkpoint_dir.rstrip("/"))
    checked = 0
    for name in chain_names(manifest, checkpoint_dir)[:-1]:
        link = Storage.join(root, name)
        state = checkpoint_state(storage, link)
        if state in ("absent", "incomplete"):
            what = "does not exist" if state == "absent" else "was never committed"
            problems.append(f"{checkpoint_dir}: chain link {link} {what}")
            continue
        try:
            link_manifest = read_manifest(storage, link)
        except IntegrityError as e:
            problems.append(f"chain link: {e}")
            continue
        if link_manifest is not None:
            problems.extend(
                f"chain link: {p}"
                for p in check_files(storage, link, link_manifest, sorted(link_manifest.files))
            )
            checked += len(link_manifest.files)
    return checked


def check_sidecars(storage: Storage, checkpoint_dir: str, names: list[str] | None = None) -> list[str]:
    """Check every sidecar's own checksum; returns one message per bad sidecar.

    Sidecars are outside the manifest (they change after the commit) and carry the checksum
    of their payload instead.
    """
    names = storage.ls(checkpoint_dir) if names is None else names
    problems = []
    for rel in names:
        if "/" in rel or not is_sidecar(rel):
            continue
        kind = rel[len(SIDECAR_PREFIX) : -len(SIDECAR_SUFFIX)]
        try:
            read_sidecar(storage, checkpoint_dir, kind)
        except (IntegrityError, ConfigError) as e:
            problems.append(str(e))
    return problems


def check_storage_bounds(
    storage: Storage, dcp_dir: str, md: Any, sizes: Mapping[str, int] | None = None
) -> None:
    """Refuse DCP entries whose byte ranges lie beyond their files (a header claiming a terabyte).

    Runs before anything is read or allocated. ``sizes`` maps a file name inside ``dcp_dir``
    to its size (from the manifest); files it lacks are asked of the storage.

    Raises:
        UnsafeCheckpointError: an entry's ``offset + length`` is beyond its file's size.
    """
    known = dict(sizes or {})
    for index, info in (getattr(md, "storage_data", None) or {}).items():
        rel = str(getattr(info, "relative_path", ""))
        if rel not in known:
            path = Storage.join(dcp_dir, rel)
            known[rel] = storage.size(path) if storage.exists(path) else 0
        end = int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0))
        if end > known[rel]:
            raise UnsafeCheckpointError(
                f"{Storage.join(dcp_dir, DCP_METADATA_FILE)}: entry {getattr(index, 'fqn', index)!r}"
                f" claims bytes up to {end} of {rel}, which holds {known[rel]}; the metadata does not"
                " match the data (corrupted or crafted); refusing to read it"
            )


def require_committed(storage: Storage, checkpoint_dir: str) -> str:
    """The commit state, raising when the checkpoint is absent or incomplete."""
    state = checkpoint_state(storage, checkpoint_dir)
    if state == "absent":
        raise CheckpointNotFoundError(
            f"checkpoint_dir[{checkpoint_dir}] not exists: no checkpoint there; check the path, or find one"
            " with latest_checkpoint(model_dir) or `reckpt ls MODEL_DIR`"
        )
    if state == "incomplete":
        raise IncompleteCheckpointError(
            f"{checkpoint_dir}: incomplete checkpoint (a save crashed or is still running);"
            " restore the previous one, e.g. latest_checkpoint(model_dir)"
        )
    return state
