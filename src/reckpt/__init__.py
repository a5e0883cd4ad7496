"""reckpt: checkpoint management and model persistence for PyTorch recommendation models.

The public functions keep TorchEasyRec's ``checkpoint_util`` names and signatures, so code
written against it ports by changing the import; the rest is reckpt's own. Names are
imported on first use, so ``import reckpt`` (and the CLI's ``--help`` and ``ls``) do not pay
for importing torch.

Example:
    >>> import reckpt
    >>> # reckpt.save_model("run/model.ckpt-100", model, optimizer)
    >>> # report = reckpt.restore_model("run/model.ckpt-100", model, optimizer)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from reckpt._version import __version__

# TorchEasyRec's flag "NVIDIA dynamicemb is importable", which its save_model consults. reckpt
# never calls that package (its own dynamic tables, reckpt.DynamicEmbedding, are always
# saved); the name exists so code and tests that patch it keep working.
has_dynamicemb = False

_EXPORTS = {
    # TorchEasyRec checkpoint_util surface
    "save_model": "reckpt.save",
    "restore_model": "reckpt.restore",
    "latest_checkpoint": "reckpt.discovery",
    "best_checkpoint": "reckpt.discovery",
    "list_distcp_param": "reckpt.inspection",
    "PartialLoadPlanner": "reckpt.planner",
    "CheckpointManager": "reckpt.manager",
    "save_dataloader_state": "reckpt.dataloader_state",
    "restore_dataloader_state": "reckpt.dataloader_state",
    "update_dataloder_state": "reckpt.dataloader_state",
    "DATALOADER_CKPT_FILENAME": "reckpt.dataloader_state",
    "DATA_TS_WATERMARK": "reckpt.dataloader_state",
    "EPOCHS_COMPLETED": "reckpt.dataloader_state",
    "should_save_on_timestamp": "reckpt.policy",
    "quorum_event_time": "reckpt.policy",
    "remap_input_tile_user_key": "reckpt.remap",
    # reckpt's own
    "LoadReport": "reckpt.report",
    "PartReport": "reckpt.report",
    "ResumeInfo": "reckpt.resume",
    "verify": "reckpt.verification",
    "VerifyReport": "reckpt.verification",
    "is_committed": "reckpt.commit",
    "list_checkpoints": "reckpt.discovery",
    "CheckpointInfo": "reckpt.policy",
    "inspect_checkpoint": "reckpt.inspection",
    "CheckpointContents": "reckpt.inspection",
    "lease": "reckpt.leases",
    "LatestN": "reckpt.policy",
    "BestN": "reckpt.policy",
    "EveryNSteps": "reckpt.policy",
    "EveryNSeconds": "reckpt.policy",
    "PinnedSteps": "reckpt.policy",
    "load_unsharded": "reckpt.unsharded",
    "init_parameters": "reckpt.meta_init",
    "plan_constraints": "reckpt.plan",
    "IncrementalPolicy": "reckpt.policy",
    "RowTracker": "reckpt.row_tracker",
    "DynamicEmbedding": "reckpt.dynamic",
    "save_delta": "reckpt.delta",
    "Preemption": "reckpt.preemption",
}

__all__ = ["__version__", "errors", "has_dynamicemb", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name == "errors":
        return importlib.import_module("reckpt.errors")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'reckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from reckpt import errors as errors
    from reckpt.commit import is_committed as is_committed
    from reckpt.dataloader_state import (
        DATA_TS_WATERMARK as DATA_TS_WATERMARK,
    )
    from reckpt.dataloader_state import (
        DATALOADER_CKPT_FILENAME as DATALOADER_CKPT_FILENAME,
    )
    from reckpt.dataloader_state import (
        EPOCHS_COMPLETED as EPOCHS_COMPLETED,
    )
    from reckpt.dataloader_state import (
        restore_dataloader_state as restore_dataloader_state,
    )
    from reckpt.dataloader_state import (
        save_dataloader_state as save_dataloader_state,
    )
    from reckpt.dataloader_state import (
        update_dataloder_state as update_dataloder_state,
    )
    from reckpt.delta import save_delta as save_delta
    from reckpt.discovery import (
        best_checkpoint as best_checkpoint,
    )
    from reckpt.discovery import (
        latest_checkpoint as latest_checkpoint,
    )
    from reckpt.discovery import (
        list_checkpoints as list_checkpoints,
    )
    from reckpt.dynamic import DynamicEmbedding as DynamicEmbedding
    from reckpt.inspection import (
        CheckpointContents as CheckpointContents,
    )
    from reckpt.inspection import (
        inspect_checkpoint as inspect_checkpoint,
    )
    from reckpt.inspection import (
        list_distcp_param as list_distcp_param,
    )
    from reckpt.leases import lease as lease
    from reckpt.manager import CheckpointManager as CheckpointManager
    from reckpt.meta_init import init_parameters as init_parameters
    from reckpt.plan import plan_constraints as plan_constraints
    from reckpt.planner import PartialLoadPlanner as PartialLoadPlanner
    from reckpt.policy import (
        BestN as BestN,
    )
    from reckpt.policy import (
        CheckpointInfo as CheckpointInfo,
    )
    from reckpt.policy import (
        EveryNSeconds as EveryNSeconds,
    )
    from reckpt.policy import (
        EveryNSteps as EveryNSteps,
    )
    from reckpt.policy import IncrementalPolicy as IncrementalPolicy
    from reckpt.policy import (
        LatestN as LatestN,
    )
    from reckpt.policy import (
        PinnedSteps as PinnedSteps,
    )
    from reckpt.policy import quorum_event_time as quorum_event_time
    from reckpt.policy import should_save_on_timestamp as should_save_on_timestamp
    from reckpt.preemption import Preemption as Preemption
    from reckpt.remap import remap_input_tile_user_key as remap_input_tile_user_key
    from reckpt.report import LoadReport as LoadReport
    from reckpt.report import PartReport as PartReport
    from reckpt.restore import restore_model as restore_model
    from reckpt.resume import ResumeInfo as ResumeInfo
    from reckpt.row_tracker import RowTracker as RowTracker
    from reckpt.save import save_model as save_model
    from reckpt.unsharded import load_unsharded as load_unsharded
    from reckpt.verification import VerifyReport as VerifyReport
    from reckpt.verification import verify as verify
