"""Scenarios run by tests/distributed on real gloo process groups (see launcher.run_world)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import reckpt
from tests.helpers.sharded import gather_all

ST_SHAPE = (12, 4)
DT_SHAPE = (10, 3)


def global_tables(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*ST_SHAPE, generator=g), torch.randn(*DT_SHAPE, generator=g)


_MESHES: dict[int, Any] = {}


def _mesh(world: int) -> Any:
    """One CPU device mesh per process (each new mesh would create process groups)."""
    from torch.distributed.device_mesh import init_device_mesh

    if world not in _MESHES:
        _MESHES[world] = init_device_mesh("cpu", (world,))
    return _MESHES[world]


class Holder(nn.Module):
    """A dense layer plus a ShardedTensor table and a DTensor table (plain tensors when unsharded)."""

    def __init__(self, seed: int, sharded: bool, lin_name: str = "lin", extra: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        setattr(self, lin_name, nn.Linear(4, 3))
        self.extra = nn.Linear(2, 2) if extra else None
        st, dt = global_tables(seed)
        if sharded:
            from torch.distributed._shard import sharded_tensor
            from torch.distributed._shard.sharding_spec import ChunkShardingSpec
            from torch.distributed.tensor import Shard, distribute_tensor

            world = dist.get_world_size()
            spec = ChunkShardingSpec(dim=0, placements=[f"rank:{r}/cpu" for r in range(world)])
            self.st: Any = sharded_tensor.empty(spec, *ST_SHAPE)
            for shard in self.st.local_shards():
                off, n = shard.metadata.shard_offsets[0], shard.metadata.shard_sizes[0]
                shard.tensor.copy_(st[off : off + n])
            self.dt: Any = distribute_tensor(dt, _mesh(world), [Shard(0)])
        else:
            self.st, self.dt = st, dt

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        sd = super().state_dict(*args, **kwargs)
        sd["tables.st"] = self.st
        sd["tables.dt"] = self.dt
        return sd

    def load_state_dict(self, sd: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        sd = dict(sd)
        sd.pop("tables.st"), sd.pop("tables.dt")  # loaded in place by DCP
        return super().load_state_dict(sd, strict=strict)

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The full (gathered) tables."""
        from torch.distributed.tensor import DTensor

        dt = self.dt.full_tensor() if isinstance(self.dt, DTensor) else self.dt
        if isinstance(self.st, torch.Tensor) and not hasattr(self.st, "local_shards"):
            return self.st, dt
        return gather_all({"st": self.st})["st"], dt


def step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """One deterministic optimizer step, identical on every rank (as DDP would make it)."""
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    opt.step()


def save_and_restore_world(rank: int, world: int, root: str, single_ckpt: str | None) -> None:
    """Save on `world` ranks; restore at the same size, partially and remapped; load a 1-rank checkpoint."""
    model = Holder(seed=1, sharded=True)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    step(model, opt)
    ckpt = f"{root}/model.ckpt-1"
    reckpt.save_model(ckpt, model, opt, dataloader_state={f"part:{rank}": 10 * (rank + 1)})
    assert reckpt.is_committed(ckpt)
    assert reckpt.restore_dataloader_state(ckpt) == {f"part:{r}": 10 * (r + 1) for r in range(world)}

    fresh = Holder(seed=2, sharded=True)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.9)
    report = reckpt.restore_model(ckpt, fresh, fresh_opt)
    assert report.verified
    want_st, want_dt = global_tables(1)
    got_st, got_dt = fresh.tables()
    assert torch.equal(got_st, want_st) and torch.equal(got_dt, want_dt)
    assert torch.equal(fresh.lin.weight, model.lin.weight)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][k], fresh_opt.state[q][k]), k
    assert fresh_opt.param_groups[0]["lr"] == 0.1

    # Partial + remapped: the dense layer was renamed, a layer added.
    map_path = f"{root}/map.txt"
    if rank == 0:
        with open(map_path, "w") as f:
            f.write("dense.weight lin.weight\ndense.bias lin.bias\n")
    dist.barrier()
    tuned = Holder(seed=3, sharded=True, lin_name="dense", extra=True)
    extra_before = tuned.extra.weight.detach().clone()
    rep = reckpt.restore_model(ckpt, tuned, ckpt_param_map_path=map_path)
    assert torch.equal(tuned.dense.weight, model.lin.weight)
    assert torch.equal(tuned.extra.weight, extra_before)
    assert rep.missing_keys == ["extra.bias", "extra.weight"]
    assert rep.part("model").remapped == {"dense.weight": "lin.weight", "dense.bias": "lin.bias"}

    if single_ckpt is not None:  # 1 -> world
        one = Holder(seed=4, sharded=True)
        reckpt.restore_model(single_ckpt, one)
        got_st, got_dt = one.tables()
        want_st, want_dt = global_tables(100)
        assert torch.equal(got_st, want_st) and torch.equal(got_dt, want_dt)


def restore_world(rank: int, world: int, ckpt: str) -> None:
    """Load a checkpoint saved at another world size into `world` ranks."""
    model = Holder(seed=5, sharded=True)
    opt = torch.optim.Adam(model.parameters(), lr=0.9)
    reckpt.restore_model(ckpt, model, opt)
    want_st, want_dt = global_tables(1)
    got_st, got_dt = model.tables()
    assert torch.equal(got_st, want_st) and torch.equal(got_dt, want_dt)
    assert opt.param_groups[0]["lr"] == 0.1
    assert int(opt.state[model.lin.weight]["step"]) == 1


def manager_world(rank: int, world: int, root: str) -> None:
    """CheckpointManager on a real process group: async saves on the background group, retention,
    per-rank RNG and merged dataloader state on resume."""
    torch.manual_seed(1000 + rank)
    model = Holder(seed=1, sharded=True)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    mgr = reckpt.CheckpointManager(root, keep_checkpoint_max=2, save_steps=2, async_save=True)
    expected_rng = None
    for s in range(1, 7):
        step(model, opt)
        if mgr.maybe_save(s, model, opt, dataloader_state={f"part:{rank}": s * 10 + rank}):
            mgr.record_eval(s, {"auc": 0.5 + s / 100})
            if s == 6:
                expected_rng = torch.rand(3)  # what this rank draws right after the last save
        # training collectives go on while the background group commits
        dist.all_reduce(torch.ones(1))
    mgr.close()
    steps = [c.step for c in reckpt.list_checkpoints(root) if c.committed]
    assert steps == [4, 6], steps

    fresh = Holder(seed=9, sharded=True)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.9)
    torch.manual_seed(5)
    mgr2 = reckpt.CheckpointManager(root)
    path, latest = mgr2.latest_checkpoint()
    info = mgr2.restore(path, fresh, fresh_opt)
    assert latest == 6 and info.step == 6
    assert info.dataloader_state == {f"part:{r}": 60 + r for r in range(world)}
    assert torch.equal(torch.rand(3), expected_rng), "each rank resumes its own RNG stream"
    assert torch.equal(fresh.lin.weight, model.lin.weight)
    assert mgr2.best_checkpoint() == (path, 6)
    mgr2.close()
