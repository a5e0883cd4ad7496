"""Planner constraints from a saved plan, and materialising meta-device models (no process group)."""

from __future__ import annotations

import torch
from torch import nn

import reckpt


def _entry(sharding_type: str) -> dict[str, object]:
    return {"sharding_type": sharding_type, "compute_kernel": "fused", "ranks": [0, 1]}


PLAN = {
    "model.ebc": {"a": _entry("data_parallel"), "b": _entry("row_wise"), "c": _entry("column_wise")},
    "model.ebc_user": {"d": _entry("data_parallel")},
}


def test_data_parallel_tables_are_pinned_unless_the_user_constrains_them() -> None:
    from torchrec.distributed.planner import ParameterConstraints

    got = reckpt.sharding.plan_constraints(PLAN)
    assert {t: c.sharding_types for t, c in got.items()} == {"a": ["data_parallel"], "d": ["data_parallel"]}
    mine = {"a": ParameterConstraints(sharding_types=["table_wise"])}
    got = reckpt.sharding.plan_constraints(PLAN, mine)
    assert got["a"] is mine["a"] and got["d"].sharding_types == ["data_parallel"]
    assert mine == {"a": mine["a"]}, "the user's mapping is not modified"


def test_pin_all_and_no_plan() -> None:
    got = reckpt.sharding.plan_constraints(PLAN, pin_all=True)
    assert {t: c.sharding_types[0] for t, c in got.items()} == {
        "a": "data_parallel",
        "b": "row_wise",
        "c": "column_wise",
        "d": "data_parallel",
    }
    assert all(c.compute_kernels is None for c in got.values()), "kernels are re-derived"
    assert reckpt.sharding.plan_constraints(None) == {}


class _Resettable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(3, 2))
        self.register_buffer("seen", torch.ones(2))
        self.register_buffer("scratch", torch.ones(2), persistent=False)
        self.resets = 0

    def reset_parameters(self) -> None:
        self.resets += 1
        nn.init.constant_(self.weight, 0.5)


def test_init_parameters_materialises_meta_tensors_children_first() -> None:
    with torch.device("meta"):
        model = nn.Sequential(_Resettable(), nn.Linear(2, 2))
    model[1].weight.requires_grad_(False)
    real = torch.ones(2)
    model[1].register_buffer("kept", real)
    replaced = reckpt.sharding.init_parameters(model, "cpu")
    assert replaced == ["0.weight", "0.seen", "0.scratch", "1.weight", "1.bias"]
    inner = model[0]
    assert inner.resets == 1 and torch.equal(inner.weight, torch.full((3, 2), 0.5))
    assert torch.equal(inner.seen, torch.zeros(2)) and "scratch" not in inner.state_dict()
    assert not model[1].weight.requires_grad and model[1].weight.device.type == "cpu"
    assert model[1].kept is real, "tensors not on the meta device are left alone"
    assert reckpt.sharding.init_parameters(model, "cpu") == []
