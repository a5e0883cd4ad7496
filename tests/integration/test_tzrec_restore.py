"""TorchEasyRec's own restore cases (``checkpoint_util_test.py``), written against reckpt.

Dense EMA objects with ``state_dict()`` but no ``load_state_dict()``, ``INPUT_TILE=3`` twins
of legacy ``ec_list`` keys, and ``error_on_missing_keys`` raising a ``RuntimeError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

import reckpt
from reckpt.errors import KeyMismatchError

N_AVERAGED = "__n_averaged__"


class StateOnlyEMA:
    """TorchEasyRec's ``DenseEMA`` interface: ``update``, ``reset``, ``state_dict``; no loader.

    ``state_dict()`` returns the live averaged tensors and the update counter, so a restore
    must fill them in place.
    """

    def __init__(self, params: dict[str, nn.Parameter], decay: float) -> None:
        self.names = list(params)
        self.sources = list(params.values())
        self.averages = [p.detach().clone() for p in self.sources]
        self.decay = decay
        self.n_averaged = torch.zeros((), dtype=torch.int64)

    @torch.no_grad()
    def update(self) -> None:
        for avg, src in zip(self.averages, self.sources, strict=True):
            if int(self.n_averaged) == 0:
                avg.copy_(src)
            else:
                avg.mul_(self.decay).add_(src, alpha=1 - self.decay)
        self.n_averaged += 1

    @torch.no_grad()
    def reset(self) -> None:
        self.n_averaged.zero_()
        for avg, src in zip(self.averages, self.sources, strict=True):
            avg.copy_(src)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**dict(zip(self.names, self.averages, strict=True)), N_AVERAGED: self.n_averaged}


class Dense(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(3, 2)
        self.dense = nn.Linear(2, 1)
        self.bn = nn.BatchNorm1d(1)


def _ema_of(model: Dense) -> StateOnlyEMA:
    return StateOnlyEMA({"dense.weight": model.dense.weight, "dense.bias": model.dense.bias}, decay=0.5)


def _full(t: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full_like(t, value)


def test_dense_ema_without_load_state_dict_saves_resumes_and_overlays(tmp_path: Path) -> None:
    model = Dense()
    ema = _ema_of(model)
    with torch.no_grad():
        model.dense.weight.fill_(2.0)
        model.dense.bias.fill_(2.0)
        model.embedding.weight.fill_(5.0)
        model.bn.running_mean.fill_(7.0)
    ema.update()  # average 2
    with torch.no_grad():
        model.dense.weight.fill_(4.0)
        model.dense.bias.fill_(4.0)
    ema.update()  # average 0.5 * 2 + 0.5 * 4 = 3
    ckpt = reckpt.save_model(str(tmp_path / "model.ckpt-2"), model, dense_ema=ema)

    raw = Dense()
    reckpt.restore_model(ckpt, raw)
    assert torch.equal(raw.dense.weight, _full(raw.dense.weight, 4.0))
    assert torch.equal(raw.embedding.weight, _full(raw.embedding.weight, 5.0))
    assert torch.equal(raw.bn.running_mean, _full(raw.bn.running_mean, 7.0))

    overlay = Dense()
    reckpt.restore_model(ckpt, overlay, use_dense_ema=True)
    assert torch.equal(overlay.dense.weight, _full(overlay.dense.weight, 3.0))
    assert torch.equal(overlay.embedding.weight, _full(overlay.embedding.weight, 5.0))
    assert torch.equal(overlay.bn.running_mean, _full(overlay.bn.running_mean, 7.0))

    resumed = Dense()
    resumed_ema = _ema_of(resumed)
    report = reckpt.restore_model(ckpt, resumed, dense_ema=resumed_ema)
    assert torch.equal(resumed.dense.weight, _full(resumed.dense.weight, 4.0))
    assert torch.equal(resumed_ema.state_dict()["dense.weight"], _full(resumed.dense.weight, 3.0))
    assert int(resumed_ema.n_averaged) == 2
    assert report.part("dense_ema").not_applied == []


def test_dense_ema_without_checkpoint_resets_to_restored_weights(tmp_path: Path) -> None:
    model = nn.Linear(2, 1)
    ema = StateOnlyEMA({"weight": model.weight, "bias": model.bias}, decay=0.5)
    ema.update()
    assert int(ema.n_averaged) == 1
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.bias.fill_(4.0)
    ckpt = reckpt.save_model(str(tmp_path / "model.ckpt-1"), model)
    reckpt.restore_model(ckpt, model, dense_ema=ema)
    assert int(ema.n_averaged) == 0
    assert torch.equal(ema.state_dict()["weight"], _full(model.weight, 3.0))
    assert torch.equal(ema.state_dict()["bias"], _full(model.bias, 4.0))


def test_partial_dense_ema_checkpoint_keeps_restored_parameters(tmp_path: Path) -> None:
    """The EMA saved ``weight`` only: ``bias`` restarts from the restored model's bias."""
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.bias.fill_(3.0)
    ema = StateOnlyEMA({"weight": model.weight}, decay=0.5)
    ema.update()
    with torch.no_grad():
        model.weight.fill_(4.0)
        model.bias.fill_(5.0)
    ckpt = reckpt.save_model(str(tmp_path / "model.ckpt-1"), model, dense_ema=ema)
    resumed = nn.Linear(2, 1)
    resumed_ema = StateOnlyEMA({"weight": resumed.weight, "bias": resumed.bias}, decay=0.5)
    reckpt.restore_model(ckpt, resumed, dense_ema=resumed_ema)
    assert int(resumed_ema.n_averaged) == 1
    assert torch.equal(resumed_ema.state_dict()["weight"], _full(resumed.weight, 2.0))
    assert torch.equal(resumed_ema.state_dict()["bias"], _full(resumed.bias, 5.0))


class Counter:
    """An extra state without ``load_state_dict``: one tensor, one plain value."""

    def __init__(self, value: float, epoch: int) -> None:
        self.w = torch.full((3,), value)
        self.epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.w.detach(), "epoch": self.epoch}  # a new tensor object, same storage


def test_extra_state_without_load_state_dict_reports_values_it_cannot_set(tmp_path: Path) -> None:
    m = nn.Linear(1, 1)
    ckpt = reckpt.save_model(str(tmp_path / "model.ckpt-1"), m, extra_states={"counter": Counter(2.0, 3)})
    target = Counter(0.0, 0)
    report = reckpt.restore_model(ckpt, nn.Linear(1, 1), extra_states={"counter": target})
    assert torch.equal(target.w, torch.full((3,), 2.0))
    assert target.epoch == 0  # cannot be set without load_state_dict: kept, and said so
    assert report.part("counter").not_applied == ["epoch"]
    assert any("counter" in n and "epoch" in n and "load_state_dict" in n for n in report.notes)
    assert "not applied: epoch" in report.summary()


def _nested_embedding(path: tuple[str, ...], value: float) -> nn.Module:
    root = nn.Module()
    parent = root
    for name in path[:-1]:
        child = nn.Module()
        parent.add_module(name, child)
        parent = child
    emb = nn.Embedding(2, 4)
    nn.init.constant_(emb.weight, value)
    parent.add_module(path[-1], emb)
    return root


@pytest.mark.parametrize(
    ("source", "target"),
    [
        (("group", "ebc", "embedding_bags", "table"), ("group", "ebc_user", "embedding_bags", "table")),
        (("group", "ec_list", "0"), ("group", "ec_dict_user", "4")),  # twin of a legacy key
    ],
    ids=["ebc", "legacy_ec_list"],
)
def test_input_tile_restores_without_mapping_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: tuple[str, ...], target: tuple[str, ...]
) -> None:
    saved = _nested_embedding(source, 1.0)
    dcp.save(saved.state_dict(), checkpoint_id=str(tmp_path / "ckpt" / "model"), no_dist=True)
    model = _nested_embedding(target, 0.0)
    key = ".".join(target) + ".weight"
    with pytest.raises(KeyMismatchError, match="none of the model's 1 keys"):  # INPUT_TILE unset
        reckpt.restore_model(str(tmp_path / "ckpt"), model)
    assert torch.equal(model.state_dict()[key], torch.zeros(2, 4))
    monkeypatch.setenv("INPUT_TILE", "3")
    report = reckpt.restore_model(str(tmp_path / "ckpt"), model)
    assert torch.equal(model.state_dict()[key], saved.state_dict()[".".join(source) + ".weight"])
    assert report.part("model").remapped == {key: ".".join(source) + ".weight"}


def test_error_on_missing_keys_raises_runtime_error(tmp_path: Path) -> None:
    class Small(nn.Module):
        def __init__(self, extra: bool = False) -> None:
            super().__init__()
            self.dense = nn.Linear(4, 2)
            if extra:
                self.extra = nn.Linear(2, 2)

    model = Small()
    ckpt = reckpt.save_model(str(tmp_path / "model.ckpt-1"), model)
    restored = Small(extra=True)
    extra = restored.extra.weight.detach().clone()
    reckpt.restore_model(ckpt, restored)
    assert torch.equal(restored.dense.weight, model.dense.weight)
    assert torch.equal(restored.extra.weight, extra)
    with pytest.raises(RuntimeError, match=r"extra\.weight"):
        reckpt.restore_model(ckpt, restored, error_on_missing_keys=True)
