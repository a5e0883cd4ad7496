"""Save one checkpoint; run as a subprocess that a fault point may SIGKILL (crash tests)."""

from __future__ import annotations

import sys

import reckpt
from tests.helpers import trained

if __name__ == "__main__":
    root, step = sys.argv[1], int(sys.argv[2])
    model, opt = trained(seed=step)
    reckpt.save_model(f"{root}/model.ckpt-{step}", model, opt, dataloader_state={"a:0": step})
    print("saved")
