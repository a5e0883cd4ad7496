"""The one way reckpt loads a DCP part: :func:`load_part`.

Every read of a saved part (a restore's parts, whole tensors for a conversion, the unsharded
loader's batches, ``read_part``'s plain values) goes through here, so each is read by
:class:`~reckpt.dcp.reader.SafeReader` (allow-listed metadata, entries kept inside the
checkpoint, tensors read straight into their destinations) and each DCP failure becomes a
reckpt error the same way (:func:`~reckpt.dcp.writer.dcp_call`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadPlanner
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

from reckpt.dcp.reader import SafeReader
from reckpt.dcp.writer import dcp_call
from reckpt.dist import Dist
from reckpt.storage.core import Storage

if TYPE_CHECKING:
    from reckpt.format.read_verify import ReadVerifier

__all__ = ["load_part"]


def load_part(
    state_dict: dict[str, Any],
    storage: Storage,
    dcp_dir: str,
    planner: LoadPlanner,
    *,
    metadata: Metadata | None = None,
    dist: Dist | None = None,
    verifier: ReadVerifier | None = None,
    part: str = "",
    what: str | None = None,
) -> SafeReader:
    """Load the DCP directory ``dcp_dir`` into ``state_dict`` (in place), as ``planner`` plans.

    Collective when ``dist`` is an active group: every rank of ``dist.group`` calls it with
    its own ``state_dict`` (possibly empty) and DCP reshards the saved chunks across them;
    any rank's failure is raised on every rank. With ``dist`` ``None`` (or inactive) this
    process reads alone, whatever world size saved the part.

    Args:
        state_dict: the destination; tensors are filled in place, other values replaced.
        storage: the checkpoint's storage.
        dcp_dir: the part's directory (``<checkpoint>/<part>``).
        planner: the load planner (keys, renames, shapes); its ``load_bytes`` must load
            non-tensor items safely (:class:`~reckpt.dcp.planner.PartialLoadPlanner` does).
        metadata: the part's metadata when already read (and checked); read otherwise.
        dist: the ranks taking part; ``None`` reads in this process only.
        verifier: hash the data files while reading them (see :mod:`reckpt.format.read_verify`).
        part: the part's name, the prefix of its files in the manifest (with ``verifier``).
        what: the failure message's beginning (default ``"loading <dcp_dir>"``).

    Returns:
        The reader, which counts items read directly (``direct_items``) and through DCP.

    Raises:
        CheckpointError: a reckpt error raised while loading, by the lowest failing rank.
        DistributedCheckpointError: any other failure, naming every failing rank.
    """
    reader = SafeReader(dcp_dir, storage, metadata, verifier=verifier, part=part)
    active = dist is not None and dist.active
    dcp_call(
        dcp_load,
        what or f"loading {dcp_dir}",
        state_dict,
        storage_reader=reader,
        planner=planner,
        process_group=dist.group if dist is not None else None,
        no_dist=not active,
    )
    return reader
