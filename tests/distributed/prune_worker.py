"""Prune a model_dir down to its newest checkpoint; run as a subprocess a fault point may SIGKILL."""

from __future__ import annotations

import sys

import reckpt

if __name__ == "__main__":
    mgr = reckpt.CheckpointManager(sys.argv[1], keep_checkpoint_max=1)
    mgr.prune()
    mgr.close()
    print("pruned")
