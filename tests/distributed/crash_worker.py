"""Save one checkpoint; run as a subprocess that a fault point may SIGKILL (crash tests).

``python -m tests.distributed.crash_worker ROOT STEP [sync|async]``
"""

from __future__ import annotations

import sys

import torch

import reckpt
from tests.helpers import trained

if __name__ == "__main__":
    root, step = sys.argv[1], int(sys.argv[2])
    mode = sys.argv[3] if len(sys.argv) > 3 else "sync"
    model, opt = trained(seed=step)
    if mode == "sync":
        reckpt.save_model(f"{root}/model.ckpt-{step}", model, opt, dataloader_state={"a:0": step})
    else:
        mgr = reckpt.CheckpointManager(root, async_save=True)
        mgr.save(step, model, opt, dataloader_state={"a:0": step})
        with torch.no_grad():  # training goes on while the background thread writes
            for _ in range(1000):
                for p in model.parameters():
                    p.mul_(0.999)
        mgr.close()
    print("saved")
