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
from reckpt.dataloader_state import restore_dataloader_state
from reckpt.discovery import latest_checkpoint
from reckpt.inspection import CheckpointContents, inspect_checkpoint, list_distcp_param
from reckpt.planner import PartialLoadPlanner
from reckpt.report import LoadReport, PartReport
from reckpt.restore import restore_model
from reckpt.save import save_model
from reckpt.verify import VerifyReport, verify

__all__ = [
    "__version__",
    "errors",
    "save_model",
    "restore_model",
    "latest_checkpoint",
    "list_distcp_param",
    "inspect_checkpoint",
    "CheckpointContents",
    "PartialLoadPlanner",
    "LoadReport",
    "PartReport",
    "verify",
    "VerifyReport",
    "is_committed",
    "restore_dataloader_state",
]
