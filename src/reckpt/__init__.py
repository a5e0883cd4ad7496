"""reckpt: checkpoint management and model persistence for PyTorch recommendation models.

The public functions keep TorchEasyRec's ``checkpoint_util`` names and signatures, so code
written against it ports by changing the import; the rest is reckpt's own: the manager's
policies, discovery, verification and the reports a caller reads. Delta checkpoints
(:mod:`reckpt.delta`), dynamic tables (:mod:`reckpt.dynamic`), resharding and serving loads
(:mod:`reckpt.sharding`), leases and other lifecycle tools (:mod:`reckpt.lifecycle`),
inspection (:mod:`reckpt.restore`) and fault injection (:mod:`reckpt.testing`) are reached
through their sub-packages. Everything else is internal. Names are imported on first use, so
``import reckpt`` (and the CLI's ``--help`` and ``ls``) do not pay for importing torch.

Example:
    >>> import reckpt
    >>> reckpt.update_dataloader_state(state := {"a.parquet:0": 9}, {"a.parquet:0": 12})
    >>> state
    {'a.parquet:0': 12}
    >>> reckpt.LatestN(3).n
    3
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from reckpt._lazy import lazy_exports
from reckpt._version import __version__

# TorchEasyRec's flag "NVIDIA dynamicemb is importable", which its save_model consults. reckpt
# never calls that package (its own dynamic tables, reckpt.dynamic.DynamicEmbedding, are
# always saved); the name exists so code and tests that patch it keep working.
has_dynamicemb = False

_EXPORTS = {
    # TorchEasyRec's checkpoint_util surface
    "save_model": "reckpt.save.engine",
    "restore_model": "reckpt.restore.engine",
    "latest_checkpoint": "reckpt.lifecycle.discovery",
    "best_checkpoint": "reckpt.lifecycle.discovery",
    "list_distcp_param": "reckpt.restore.inspection",
    "PartialLoadPlanner": "reckpt.dcp.planner",
    "CheckpointManager": "reckpt.lifecycle.manager",
    "save_dataloader_state": "reckpt.format.dataloader_state",
    "restore_dataloader_state": "reckpt.format.dataloader_state",
    "update_dataloader_state": "reckpt.format.dataloader_state",
    "update_dataloder_state": "reckpt.format.dataloader_state",
    "DATALOADER_CKPT_FILENAME": "reckpt.format.dataloader_state",
    "DATA_TS_WATERMARK": "reckpt.format.dataloader_state",
    "EPOCHS_COMPLETED": "reckpt.format.dataloader_state",
    "should_save_on_timestamp": "reckpt.policy",
    "quorum_event_time": "reckpt.policy",
    "remap_input_tile_user_key": "reckpt.remap",
    # reckpt's own
    "list_checkpoints": "reckpt.lifecycle.discovery",
    "CheckpointInfo": "reckpt.policy",
    "is_committed": "reckpt.commit.state",
    "verify": "reckpt.format.verification",
    "VerifyReport": "reckpt.format.verification",
    "LoadReport": "reckpt.report",
    "ResumeInfo": "reckpt.lifecycle.resume",
    "LatestN": "reckpt.policy",
    "BestN": "reckpt.policy",
    "EveryNSteps": "reckpt.policy",
    "Preemption": "reckpt.lifecycle.preemption",
}
_SUBPACKAGES = ("errors", "delta", "dynamic", "sharding", "lifecycle", "restore", "testing")

__all__ = ["__version__", "errors", "has_dynamicemb", *_EXPORTS]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, _SUBPACKAGES)

if TYPE_CHECKING:
    from reckpt import errors as errors
    from reckpt.commit.state import is_committed as is_committed
    from reckpt.dcp.planner import PartialLoadPlanner as PartialLoadPlanner
    from reckpt.format.dataloader_state import DATA_TS_WATERMARK as DATA_TS_WATERMARK
    from reckpt.format.dataloader_state import DATALOADER_CKPT_FILENAME as DATALOADER_CKPT_FILENAME
    from reckpt.format.dataloader_state import EPOCHS_COMPLETED as EPOCHS_COMPLETED
    from reckpt.format.dataloader_state import restore_dataloader_state as restore_dataloader_state
    from reckpt.format.dataloader_state import save_dataloader_state as save_dataloader_state
    from reckpt.format.dataloader_state import update_dataloader_state as update_dataloader_state
    from reckpt.format.dataloader_state import update_dataloder_state as update_dataloder_state
    from reckpt.format.verification import VerifyReport as VerifyReport
    from reckpt.format.verification import verify as verify
    from reckpt.lifecycle.discovery import best_checkpoint as best_checkpoint
    from reckpt.lifecycle.discovery import latest_checkpoint as latest_checkpoint
    from reckpt.lifecycle.discovery import list_checkpoints as list_checkpoints
    from reckpt.lifecycle.manager import CheckpointManager as CheckpointManager
    from reckpt.lifecycle.preemption import Preemption as Preemption
    from reckpt.lifecycle.resume import ResumeInfo as ResumeInfo
    from reckpt.policy import BestN as BestN
    from reckpt.policy import CheckpointInfo as CheckpointInfo
    from reckpt.policy import EveryNSteps as EveryNSteps
    from reckpt.policy import LatestN as LatestN
    from reckpt.policy import quorum_event_time as quorum_event_time
    from reckpt.policy import should_save_on_timestamp as should_save_on_timestamp
    from reckpt.remap import remap_input_tile_user_key as remap_input_tile_user_key
    from reckpt.report import LoadReport as LoadReport
    from reckpt.restore.engine import restore_model as restore_model
    from reckpt.save.engine import save_model as save_model
