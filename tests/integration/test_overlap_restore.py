"""A key whose shape changed loads its overlapping block, as TorchEasyRec does, and says so.

Expected values are built by hand from the saved tensors (slices of them), never by a second
reckpt restore: TorchEasyRec's planner plans reads by chunk overlap, so a tensor of another
shape gets ``saved[0:a, 0:b]`` in its corner and keeps everything else.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import reckpt
from reckpt.errors import IntegrityError, ShapeMismatchError
from tests.helpers import flip_byte, fresh, state_dicts_equal, trained

DIM = 4


class Tables(nn.Module):
    """``n`` embedding tables (``t0`` may have its own row count) and a linear layer over them."""

    def __init__(self, n: int, rows: int = 10, rows_t0: int | None = None) -> None:
        super().__init__()
        self.emb = nn.ModuleDict(
            {f"t{i}": nn.Embedding(rows_t0 if i == 0 and rows_t0 else rows, DIM) for i in range(n)}
        )
        self.linear = nn.Linear(DIM * n, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat([e(ids) for e in self.emb.values()], dim=-1))


def _trained_tables(n: int, **kw: int) -> tuple[Tables, torch.optim.Adam]:
    torch.manual_seed(0)
    m = Tables(n, **kw)
    o = torch.optim.Adam(m.parameters(), lr=0.05)
    for step in range(3):
        o.zero_grad()
        m(torch.arange(step, step + 6)).pow(2).mean().backward()
        o.step()
    return m, o


def _clone(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone()


def _corner(big: torch.Tensor, small: torch.Tensor) -> tuple[slice, ...]:
    return tuple(slice(0, min(a, b)) for a, b in zip(big.shape, small.shape, strict=True))


def test_wider_linear_after_more_tables_gets_torcheasyrec_values(tmp_path: Path, caplog) -> None:
    """2 tables -> 3 tables (t0 also grew by 4 rows): the linear layer reads [3, 8] of [3, 12]."""
    old, old_opt = _trained_tables(2)
    ckpt = reckpt.save_model(str(tmp_path / "model.ckpt-3"), old, old_opt)
    torch.manual_seed(7)
    new = Tables(3, rows_t0=14)
    new_opt = torch.optim.Adam(new.parameters(), lr=0.05)
    init = {k: _clone(v) for k, v in new.state_dict().items()}

    with caplog.at_level(logging.WARNING, logger="reckpt"):
        report = reckpt.restore_model(ckpt, new, new_opt)

    saved_w, got_w = old.linear.weight, new.linear.weight
    assert torch.equal(got_w[:, :8], saved_w) and torch.equal(got_w[:, 8:], init["linear.weight"][:, 8:])
    assert torch.equal(new.linear.bias, old.linear.bias)
    t0 = new.emb["t0"].weight
    assert torch.equal(t0[:10], old.emb["t0"].weight) and torch.equal(t0[10:], init["emb.t0.weight"][10:])
    assert torch.equal(new.emb["t1"].weight, old.emb["t1"].weight)
    assert torch.equal(new.emb["t2"].weight, init["emb.t2.weight"])  # missing: kept

    # Adam's state follows the same rule; the rest of it is the state a fresh step creates (0).
    for name in ("exp_avg", "exp_avg_sq"):
        saved_s, got_s = old_opt.state[old.linear.weight][name], new_opt.state[new.linear.weight][name]
        assert torch.equal(got_s[:, :8], saved_s) and not got_s[:, 8:].any()
        saved_e, got_e = old_opt.state[old.emb["t0"].weight][name], new_opt.state[t0][name]
        assert torch.equal(got_e[:10], saved_e) and not got_e[10:].any()
    assert torch.equal(new_opt.state[new.linear.weight]["step"], old_opt.state[old.linear.weight]["step"])
    assert new.emb["t2"].weight not in new_opt.state  # unknown to the checkpoint: starts fresh

    model = report.part("model")
    assert model.resized == ["emb.t0.weight", "linear.weight"] and model.missing == ["emb.t2.weight"]
    shapes = {m.key: (m.saved, m.current, m.block) for m in model.shape_mismatched}
    assert shapes == {
        "emb.t0.weight": ((10, 4), (14, 4), (10, 4)),
        "linear.weight": ((3, 8), (3, 12), (3, 8)),
    }
    optim = report.part("optimizer")
    assert (
        "state.linear.weight.exp_avg" in optim.resized and "state.emb.t0.weight.exp_avg_sq" in optim.resized
    )
    assert "linear.weight: saved [3, 8], current [3, 12], loaded [0:3, 0:8]" in report.summary()
    logged = [r.getMessage() for r in caplog.records if "loading the overlap" in r.getMessage()]
    assert len(logged) == len(model.resized) + len(optim.resized)  # once per key
    assert sum("linear.weight: saved" in msg for msg in logged) == 1


@pytest.mark.parametrize(
    ("saved_shape", "current_shape"), [((4, 2), (6, 3)), ((6, 3), (4, 2)), ((4, 2), (3, 4))]
)
def test_linear_of_another_size_gets_the_overlapping_block(
    tmp_path: Path, saved_shape: tuple[int, int], current_shape: tuple[int, int]
) -> None:
    """TorchEasyRec's verified case (Linear(4, 2) into Linear(6, 3)), shrinking, and a mix."""
    torch.manual_seed(1)
    old = nn.Linear(*saved_shape)
    old_opt = torch.optim.Adam(old.parameters(), lr=0.1)
    old(torch.randn(5, saved_shape[0])).sum().backward()
    old_opt.step()
    ckpt = reckpt.save_model(str(tmp_path / "model.ckpt-1"), old, old_opt)
    new = nn.Linear(*current_shape)
    new_opt = torch.optim.Adam(new.parameters(), lr=0.1)
    init_w, init_b = _clone(new.weight), _clone(new.bias)

    reckpt.restore_model(ckpt, new, new_opt)

    want_w, want_b = init_w.clone(), init_b.clone()
    corner = _corner(old.weight, new.weight)
    want_w[corner] = old.weight.detach()[corner]
    want_b[: min(saved_shape[1], current_shape[1])] = old.bias.detach()[: current_shape[1]]
    assert torch.equal(new.weight, want_w) and torch.equal(new.bias, want_b)
    for name in ("exp_avg", "exp_avg_sq"):
        want = torch.zeros(current_shape[::-1])
        want[corner] = old_opt.state[old.weight][name][corner]
        assert torch.equal(new_opt.state[new.weight][name], want)


def test_strict_shapes_refuses_any_change_before_loading(tmp_path: Path) -> None:
    m, o = trained()
    ckpt = reckpt.save_model(str(tmp_path / "model.ckpt-1"), m, o)
    m2, o2 = fresh(rows=60)
    before = {k: _clone(v) for k, v in m2.state_dict().items()}
    with pytest.raises(
        ShapeMismatchError, match=r"emb\.user\.weight.*\[50, 4\].*\[60, 4\](?s:.*)strict_shapes"
    ):
        reckpt.restore_model(ckpt, m2, o2, strict_shapes=True)
    assert state_dicts_equal(before, m2.state_dict()) and o2.state == {}
    # CheckpointManager.restore forwards it.
    with reckpt.CheckpointManager(str(tmp_path)) as mgr, pytest.raises(ShapeMismatchError):
        mgr.restore(ckpt, m2, o2, strict_shapes=True)
    assert state_dicts_equal(before, m2.state_dict())


def test_allow_row_resize_is_the_rows_only_exception_to_strict_shapes(tmp_path: Path) -> None:
    m, o = trained()
    ckpt = reckpt.save_model(str(tmp_path / "model.ckpt-1"), m, o)
    m2, o2 = fresh(rows=60)
    init = _clone(m2.emb["user"].weight)
    report = reckpt.restore_model(ckpt, m2, o2, strict_shapes=True, allow_row_resize=True)
    assert torch.equal(m2.emb["user"].weight[:50], m.emb["user"].weight)
    assert torch.equal(m2.emb["user"].weight[50:], init[50:])
    assert report.part("model").resized == ["emb.user.weight"]
    # As before: in strict mode the optimizer state of the resized table starts afresh.
    assert "state.emb.user.weight.exp_avg" in report.part("optimizer").reinitialized
    m3, _ = fresh(dim=6)
    with pytest.raises(ShapeMismatchError, match=r"tower\.0\.weight"):
        reckpt.restore_model(ckpt, m3, strict_shapes=True, allow_row_resize=True)


class _Vector(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(shape))
        self.b = nn.Parameter(torch.randn(3))


@pytest.mark.parametrize("strict", [False, True])
def test_a_changed_number_of_dimensions_is_an_error_before_loading(tmp_path: Path, strict: bool) -> None:
    ckpt = reckpt.save_model(str(tmp_path / "model.ckpt-1"), _Vector((2, 4)))
    new = _Vector((8,))
    before = {k: _clone(v) for k, v in new.state_dict().items()}
    with pytest.raises(
        ShapeMismatchError, match=r"(?s)'w' has shape \[2, 4\], the current value \[8\].*dimensions"
    ):
        reckpt.restore_model(ckpt, new, strict_shapes=strict)
    assert state_dicts_equal(before, new.state_dict())  # b (same shape) was not loaded either


def test_param_map_and_resize(tmp_path: Path) -> None:
    """A renamed table that also grew: map file lines for the weight and its Adam state."""
    m, o = trained()
    ckpt = reckpt.save_model(str(tmp_path / "model.ckpt-1"), m, o)
    mp = tmp_path / "map.txt"
    mp.write_text(
        "emb.item.weight emb.user.weight\n"
        "state.emb.item.weight.exp_avg state.emb.user.weight.exp_avg\n"
        "state.emb.item.weight.exp_avg_sq state.emb.user.weight.exp_avg_sq\n"
        "state.emb.item.weight.step state.emb.user.weight.step\n"
    )
    m2, o2 = fresh(table="item", rows=70)
    init = _clone(m2.emb["item"].weight)
    report = reckpt.restore_model(ckpt, m2, o2, ckpt_param_map_path=str(mp))
    got, saved = m2.emb["item"].weight, m.emb["user"].weight
    assert torch.equal(got[:50], saved) and torch.equal(got[50:], init[50:])
    state = o2.state[m2.emb["item"].weight]
    saved_state = o.state[m.emb["user"].weight]
    for name in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(state[name][:50], saved_state[name]) and not state[name][50:].any()
    model = report.part("model")
    assert model.remapped == {"emb.item.weight": "emb.user.weight"} and model.resized == ["emb.item.weight"]
    (mm,) = model.shape_mismatched
    assert (mm.checkpoint_key, mm.saved, mm.current, mm.block) == (
        "emb.user.weight",
        (50, 4),
        (70, 4),
        (50, 4),
    )
    assert "state.emb.item.weight.exp_avg" in report.part("optimizer").resized


def test_direct_reads_serve_a_grown_table_and_checksums_still_cover_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reckpt.format.read_verify import ReadVerifier

    m, o = trained()
    ckpt = reckpt.save_model(str(tmp_path / "model.ckpt-1"), m, o)
    m2, _ = fresh(rows=80)
    reckpt.restore_model(ckpt, m2)
    assert torch.equal(m2.emb["user"].weight[:50], m.emb["user"].weight)

    data = next(f for f in sorted(os.listdir(f"{ckpt}/model")) if f.endswith(".distcp"))
    flip_byte(f"{ckpt}/model/{data}")
    streamed: list[str] = []
    original = ReadVerifier.read_whole

    def spy(self: ReadVerifier, rel: str, size: int, checksum: str) -> None:
        streamed.append(rel)
        original(self, rel, size, checksum)

    monkeypatch.setattr(ReadVerifier, "read_whole", spy)
    for rows in (80, 30):  # grown: read in place; shrunk: a slice, through DCP's own path
        with pytest.raises(IntegrityError, match=data):
            reckpt.restore_model(ckpt, fresh(rows=rows)[0])
    assert streamed == [f"model/{data}"] * 2  # the whole file was hashed while it was read
