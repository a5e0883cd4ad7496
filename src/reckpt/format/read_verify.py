"""A verified restore that reads every byte once: data files are checked as they are read.

Checking a checkpoint's files and then loading them reads every byte twice: once cold from
the disk to hash it, once more from the page cache to load it. :class:`ReadVerifier` splits
the work instead:

1. before anything changes, every file except the DCP data files of the parts about to be
   loaded is checked (JSON files, ``.metadata``, dynamic tables, parts not loaded), and
   those data files are looked up (present, the manifest's size: truncation is caught here);
2. while loading, :class:`~reckpt.dcp.reader.SafeReader` reads each data file front to back,
   tensors straight into their destinations, hashing every byte on the way
   (:class:`~reckpt.format.integrity.SequentialHasher`) and reporting the file's size and checksum
   here;
3. after loading, data files no rank read that way are checked, and every rank raises
   :class:`~reckpt.errors.IntegrityError` if any file failed.

So a corrupt data file is found after its bytes reached the model: the error says so, and
the caller restores another checkpoint (``CheckpointManager.restore_latest`` does). Callers
who need the objects untouched on a corrupt checkpoint pass ``verify="first"`` to
``restore_model`` (check everything, then load: two reads). Rank roles: every rank checks an
equal share of the files of steps 1 and 3, and the data files it reads itself.
"""

from __future__ import annotations

from collections.abc import Iterable

from reckpt.dist import Dist
from reckpt.format.integrity import CHECKSUM_ALGORITHM, FileRecord
from reckpt.format.manifest import Manifest
from reckpt.format.verification import check_files, integrity_error, record_problem, verify_collective
from reckpt.naming import DCP_DATA_SUFFIX
from reckpt.storage.core import Storage

__all__ = ["ReadVerifier"]

_PARTIAL = (
    "The restored objects may hold part of this checkpoint's state: restore another checkpoint"
    " (restore_latest falls back by itself), or pass verify='first' to check every file before"
    " anything changes."
)


class ReadVerifier:
    """The checks of one verified restore (see the module docstring for the three steps).

    Args:
        storage: the checkpoint's storage.
        checkpoint_dir: the checkpoint.
        manifest: its manifest (the expected sizes and checksums).
        d: the ranks taking part.
    """

    def __init__(self, storage: Storage, checkpoint_dir: str, manifest: Manifest, d: Dist) -> None:
        self.storage, self.ckpt, self.manifest, self.d = storage, checkpoint_dir, manifest, d
        self.deferred: set[str] = set()
        self.streamed: dict[str, str] = {}  # file -> problem ("" when it matched)

    def before_load(self, parts: Iterable[str]) -> None:
        """Collective: check every file now; only the sizes of the data files of ``parts``."""
        if self.manifest.checksum_algorithm == CHECKSUM_ALGORITHM:
            loaded = set(parts)
            self.deferred = {
                rel
                for rel in self.manifest.files
                if rel.endswith(DCP_DATA_SUFFIX) and rel.split("/", 1)[0] in loaded
            }
        verify_collective(
            self.storage, self.ckpt, self.manifest, self.d, sorted(self.manifest.files), self.deferred
        )

    def record(self, rel: str) -> FileRecord | None:
        """The manifest's record of ``rel`` if this rank should hash it while reading it."""
        if rel in self.deferred and rel not in self.streamed:
            return self.manifest.files[rel]
        return None

    def read_whole(self, rel: str, size: int, checksum: str) -> None:
        """A reader hashed all of ``rel``: compare with the manifest (the verdict comes later)."""
        path = Storage.join(self.ckpt, rel)
        self.streamed[rel] = record_problem(path, self.manifest.files[rel], size, checksum) or ""

    def after_load(self) -> None:
        """Collective: check the data files no rank hashed while reading; raise on any problem."""
        gathered = self.d.all_gather(self.streamed)
        seen: set[str] = set()
        problems: list[str] = []
        for streamed in gathered:
            seen.update(streamed)
            problems.extend(p for p in streamed.values() if p and p not in problems)
        rest = sorted(self.deferred - seen)[self.d.rank :: self.d.world_size]
        mine = check_files(self.storage, self.ckpt, self.manifest, rest)
        everything = problems + [p for ps in self.d.all_gather(mine) for p in ps]
        if everything:
            raise integrity_error(self.ckpt, everything, _PARTIAL)

    def explain(self, error: BaseException) -> None:
        """After a failed load (this rank only): raise IntegrityError if a data file is bad.

        A corrupt archive header makes the load itself fail; this names the damaged file
        instead of the reader's complaint. Returns when every data file is intact.
        """
        problems = [p for p in self.streamed.values() if p]
        unchecked = sorted(self.deferred - set(self.streamed))
        problems += check_files(self.storage, self.ckpt, self.manifest, unchecked)
        if problems:
            raise integrity_error(self.ckpt, problems, _PARTIAL) from error
