"""A job that exits without CheckpointManager.close(); run as a subprocess by test_exit_drain.

``prune MODEL_DIR``: queue a prune of a model_dir full of checkpoints, then exit at once.
``async MODEL_DIR MB``: start an async save of a model of about MB megabytes, then exit at once.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import reckpt

if __name__ == "__main__":
    mode, root = sys.argv[1], sys.argv[2]
    if mode == "prune":
        mgr = reckpt.CheckpointManager(root, keep_checkpoint_max=1)
        mgr.prune()
    else:
        rows = int(float(sys.argv[3]) * 2**20 / 4 / 256)
        model = nn.Embedding(rows, 256)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        mgr = reckpt.CheckpointManager(root, async_save=True)
        mgr.save(1, model, opt, {"part:0": 3})
        print("in flight:", mgr._saver.in_flight_step, flush=True)
    print("exiting without close()", flush=True)
