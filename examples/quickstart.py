"""End-to-end example: train a tiny recommender, save, restore into fresh models, report.

Run: ``.venv/bin/python examples/quickstart.py`` (writes ``./quickstart_run``, never the
trainer's ``./model_dir``)

1. trains a small model (two embedding-bag tables + an MLP) for a few steps on generated data;
2. saves model, optimizer, LR scheduler and data position as ``model_dir/model.ckpt-<step>``;
3. restores into a fresh model and optimizer and checks that both are bit-identical;
4. fine-tunes: restores into a changed model (a renamed table via a parameter map, an added
   layer) and prints the load report.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch
from torch import nn

import reckpt


class TinyRec(nn.Module):
    """Two sparse features (embedding bags) and one dense tower."""

    def __init__(self, user_table: str = "user", extra_layer: bool = False) -> None:
        super().__init__()
        self.tables = nn.ModuleDict(
            {user_table: nn.EmbeddingBag(1000, 8, mode="sum"), "item": nn.EmbeddingBag(500, 8, mode="sum")}
        )
        self.user_table = user_table
        self.mlp = nn.Sequential(nn.Linear(16 + 4, 16), nn.ReLU(), nn.Linear(16, 1))
        self.extra = nn.Linear(1, 1) if extra_layer else None

    def forward(self, users: torch.Tensor, items: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        u = self.tables[self.user_table](users)
        i = self.tables["item"](items)
        out = self.mlp(torch.cat([u, i, dense], dim=1))
        return self.extra(out) if self.extra is not None else out


def batches(seed: int, n: int) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(0, 1000, (32, 3), generator=g),
            torch.randint(0, 500, (32, 2), generator=g),
            torch.randn(32, 4, generator=g),
            torch.randint(0, 2, (32, 1), generator=g).float(),
        )
        for _ in range(n)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-dir", default="quickstart_run", help="where checkpoints go (local path or URL)"
    )
    parser.add_argument("--steps", type=int, default=20, help="training steps before the save")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)

    model = TinyRec()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    loss_fn = nn.BCEWithLogitsLoss()
    step = -1
    for u, i, x, y in batches(0, args.steps):
        step += 1
        opt.zero_grad()
        loss = loss_fn(model(u, i, x), y)
        loss.backward()
        opt.step()
        sched.step()
    print(f"trained {step + 1} steps, last loss {loss.item():.4f}")

    ckpt = f"{args.model_dir.rstrip('/')}/model.ckpt-{step}"
    reckpt.save_model(
        ckpt,
        model,
        opt,
        extra_states={"lr_scheduler": sched},
        dataloader_state={"generated:0": 32 * (step + 1) - 1},
        overwrite=True,
    )
    found, found_step = reckpt.latest_checkpoint(args.model_dir)
    print(f"saved {ckpt}; latest_checkpoint -> {found} (step {found_step})")
    print(f"verify: ok={reckpt.verify(ckpt).ok}")

    # Resume: a fresh model and optimizer become bit-identical to the trained ones.
    torch.manual_seed(123)
    fresh = TinyRec()
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.5)
    fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=5, gamma=0.5)
    report = reckpt.restore_model(ckpt, fresh, fresh_opt, extra_states={"lr_scheduler": fresh_sched})
    print(report.summary())
    same_w = all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True)
    )
    same_o = all(
        torch.equal(sa[k], sb[k])
        for sa, sb in zip(
            opt.state_dict()["state"].values(), fresh_opt.state_dict()["state"].values(), strict=True
        )
        for k in sa
    )
    same_lr = fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    print(f"resume: weights equal={same_w}, optimizer state equal={same_o}, lr equal={same_lr}")
    print(f"dataloader state: {reckpt.restore_dataloader_state(ckpt)}")

    # Fine-tune: the user table was renamed and a layer added; a parameter map bridges the rename.
    tuned = TinyRec(user_table="member", extra_layer=True)
    map_path = os.path.join(args.model_dir, "param_map.txt")
    if "://" in args.model_dir:  # a remote model_dir: give the renames directly
        ft = reckpt.restore_model(ckpt, tuned, param_map={"tables.member.weight": "tables.user.weight"})
    else:
        with open(map_path, "w") as f:
            f.write("tables.member.weight tables.user.weight\n")
        ft = reckpt.restore_model(ckpt, tuned, ckpt_param_map_path=map_path)
    print(ft.summary())
    ok = (
        same_w
        and same_o
        and same_lr
        and torch.equal(tuned.tables["member"].weight, model.tables["user"].weight)
    )
    print("quickstart OK" if ok else "quickstart FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
