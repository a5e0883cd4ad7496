"""Trainers for the tier tests: one process, or a torchrun worker that may SIGKILL itself.

``python -m tests.distributed.tiers_scenarios solo CONFIG`` trains one process;
``torchrun ... -m tests.distributed.tiers_scenarios worker CONFIG`` is one rank of a gloo job.
``CONFIG`` is a JSON file:

- ``tiers``: the tiers (``Tier.to_json`` objects), ``model_dir``: the manager's model_dir;
- ``steps``: train steps 1..steps, saving with ``maybe_save`` (``final`` at the last);
- ``rows``, ``dim``: the size of the model (``TinyRec``);
- ``kill``: ``{"step": K, "ranks": [...], "restart": R}``: those ranks SIGKILL themselves right
  after the save of step K (in torchrun's restart R), or ``null``; ``"node": "b"`` instead of
  ``ranks`` names every rank whose ``TIERS_TEST_NODE`` is ``b``; ``"after_commit"`` waits for
  the save first, ``"drain"`` also for the node's promotions;
- ``out``: a folder for ``resume-r<restart>-rank<rank>.json`` (what the restart resumed from)
  and ``final-rank<rank>.pt`` (the model and optimizer states at the end).

Training is a pure function of the state and the step: each rank draws its batch from a
generator seeded by (rank, step), gradients are averaged over the ranks with ``all_reduce``,
so a run resumed from any checkpoint ends bitwise where an uninterrupted run ends.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import reckpt
from reckpt.tiers.config import Tier, TierSet
from reckpt.tiers.control import Control
from tests.helpers.models import TinyRec


def _step(model: TinyRec, opt: torch.optim.Optimizer, rank: int, step: int, rows: int) -> None:
    g = torch.Generator().manual_seed(1_000_003 * step + rank)
    ids = torch.randint(0, rows, (32,), generator=g)
    opt.zero_grad()
    model(ids).pow(2).mean().backward()
    if dist.is_initialized():
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
    opt.step()


def run(cfg: dict[str, Any], rank: int, restart: int) -> None:
    """Resume (if anything is there), train to the end, write the outputs; or die on cue."""
    torch.manual_seed(0)
    model = TinyRec(rows=cfg["rows"], dim=cfg["dim"])
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    tiers = [Tier.from_json(t) for t in cfg["tiers"]]
    out = Path(cfg["out"])
    mgr = reckpt.CheckpointManager(cfg["model_dir"], tiers=tiers, async_save=True)
    info = mgr.restore_latest(model, opt)
    resumed: dict[str, Any] = {
        "step": None if info is None else info.step,
        "node": os.environ.get("TIERS_TEST_NODE"),
    }
    if info is not None:
        parts = getattr(info, "parts", {})
        resumed.update(
            tier=getattr(info, "tier", ""), sources=list(getattr(info, "sources", ())), parts=parts
        )
    (out / f"resume-r{restart}-rank{rank}.json").write_text(json.dumps(resumed))
    kill = cfg.get("kill") or {}
    first = 1 if info is None else info.step + 1
    for step in range(first, cfg["steps"] + 1):
        _step(model, opt, rank, step, cfg["rows"])
        mgr.maybe_save(step, model, opt, final=step == cfg["steps"])
        doomed = rank in kill.get("ranks", ()) or kill.get("node") == os.environ.get("TIERS_TEST_NODE", "")
        if step == kill.get("step") and doomed and restart == kill.get("restart", 0):
            if kill.get("drain"):  # until this node's promotions are done: S3 holds what it will hold
                mgr.wait()
                Control(TierSet(tiers).control_dir).wait_idle()
            if kill.get("after_commit"):
                mgr.wait()  # the save of this step is committed
                pending = Control(TierSet(tiers).control_dir).pending()
                (out / f"killed-rank{rank}.json").write_text(json.dumps([r.step for r in pending]))
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    mgr.close()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    torch.save(state, out / f"final-rank{rank}.pt")


def main(argv: list[str]) -> None:
    command, config = argv[1], argv[2]
    cfg = json.loads(Path(config).read_text())
    if command == "solo":
        run(cfg, 0, 0)
        return
    if command != "worker":
        raise SystemExit(f"unknown command {command!r}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    try:
        run(cfg, dist.get_rank(), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # see tests/distributed/launcher.py: skip gloo's teardown at exit


if __name__ == "__main__":
    main(sys.argv)
