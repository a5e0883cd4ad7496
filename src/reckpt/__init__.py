"""reckpt: checkpoint management and model persistence for PyTorch recommendation models.

The public functions keep TorchEasyRec's ``checkpoint_util`` names and signatures, so code
written against it ports by changing the import; the rest is reckpt's own.

Example:
    >>> import reckpt
    >>> # reckpt.save_model("run/model.ckpt-100", model, optimizer)
    >>> # report = reckpt.restore_model("run/model.ckpt-100", model, optimizer)
"""

from reckpt import errors
from reckpt._version import __version__
from reckpt.commit import is_committed
from reckpt.dataloader_state import restore_dataloader_state, update_dataloder_state
from reckpt.discovery import best_checkpoint, latest_checkpoint, list_checkpoints
from reckpt.inspection import CheckpointContents, inspect_checkpoint, list_distcp_param
from reckpt.lease import lease
from reckpt.manager import CheckpointManager
from reckpt.planner import PartialLoadPlanner
from reckpt.policy import BestN, CheckpointInfo, EveryNSeconds, EveryNSteps, LatestN, PinnedSteps
from reckpt.report import LoadReport, PartReport
from reckpt.restore import restore_model
from reckpt.resume import ResumeInfo
from reckpt.save import save_model
from reckpt.verify import VerifyReport, verify

__all__ = [
    "__version__",
    "errors",
    # TorchEasyRec checkpoint_util surface
    "save_model",
    "restore_model",
    "latest_checkpoint",
    "best_checkpoint",
    "list_distcp_param",
    "PartialLoadPlanner",
    "CheckpointManager",
    "restore_dataloader_state",
    "update_dataloder_state",
    # reckpt's own
    "LoadReport",
    "PartReport",
    "ResumeInfo",
    "verify",
    "VerifyReport",
    "is_committed",
    "list_checkpoints",
    "CheckpointInfo",
    "inspect_checkpoint",
    "CheckpointContents",
    "lease",
    "LatestN",
    "BestN",
    "EveryNSteps",
    "EveryNSeconds",
    "PinnedSteps",
]
