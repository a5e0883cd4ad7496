"""restore_model's TorchEasyRec semantics: partial loads, renames, shapes, optimizer, EMA, legacy."""

from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

import reckpt
from reckpt.errors import CheckpointNotFoundError, KeyMismatchError, ParamMapError, ShapeMismatchError
from tests.helpers import fresh, optim_states_equal, state_dicts_equal, trained


@pytest.fixture
def saved(tmp_path):
    m, o = trained()
    ckpt = str(tmp_path / "model.ckpt-10")
    reckpt.save_model(ckpt, m, o)
    return ckpt, m, o


def test_missing_keys_are_skipped_and_reported(saved, caplog) -> None:
    ckpt, m, o = saved
    m2, o2 = fresh(extra=True)
    extra_before = m2.extra.weight.detach().clone()
    with caplog.at_level(logging.WARNING):
        report = reckpt.restore_model(ckpt, m2, o2)
    assert report.missing_keys == ["extra.bias", "extra.weight"]
    assert "Skip restore state [extra.weight]" in caplog.text
    assert torch.equal(m2.extra.weight, extra_before)
    assert torch.equal(m2.emb["user"].weight, m.emb["user"].weight)
    # The new layer's optimizer state was not invented: it starts fresh on the first step.
    assert m2.extra.weight not in o2.state
    assert "state.extra.weight" in report.part("optimizer").reinitialized
    assert all(
        torch.equal(o.state[p]["exp_avg"], o2.state[q]["exp_avg"])
        for p, q in zip(m.parameters(), list(m2.parameters())[:4], strict=False)
    )


def test_error_on_missing_keys_lists_all_and_loads_nothing(saved) -> None:
    ckpt, _, _ = saved
    m2, _ = fresh(extra=True)
    before = {k: v.clone() for k, v in m2.state_dict().items()}
    with pytest.raises(KeyMismatchError, match=r"extra\.bias, extra\.weight") as ei:
        reckpt.restore_model(ckpt, m2, error_on_missing_keys=True)
    assert isinstance(ei.value, KeyError)
    assert isinstance(ei.value, RuntimeError)  # TorchEasyRec raises RuntimeError
    with pytest.raises(RuntimeError, match=r"extra\.weight"):
        reckpt.restore_model(ckpt, m2, error_on_missing_keys=True)
    assert state_dicts_equal(before, m2.state_dict())


def test_param_map_file_renames(saved, tmp_path) -> None:
    ckpt, m, _ = saved
    mp = tmp_path / "map.txt"
    mp.write_text("# renamed table\nemb.item.weight\temb.user.weight\n\n")
    m2, _ = fresh(table="item")
    report = reckpt.restore_model(ckpt, m2, ckpt_param_map_path=str(mp))
    assert torch.equal(m2.emb["item"].weight, m.emb["user"].weight)
    assert report.part("model").remapped == {"emb.item.weight": "emb.user.weight"}
    assert report.missing_keys == []


@pytest.mark.parametrize("line", ["only_one_token", "a b c"])
def test_param_map_bad_line_names_file_and_line(saved, tmp_path, line) -> None:
    ckpt, _, _ = saved
    mp = tmp_path / "map.txt"
    mp.write_text(f"emb.item.weight emb.user.weight\n{line}\n")
    m2, _ = fresh()
    before = {k: v.clone() for k, v in m2.state_dict().items()}
    with pytest.raises(ParamMapError, match=r"map\.txt:2: expected 'current_name checkpoint_name'"):
        reckpt.restore_model(ckpt, m2, ckpt_param_map_path=str(mp))
    assert state_dicts_equal(before, m2.state_dict())


def test_param_map_missing_file(saved, tmp_path) -> None:
    ckpt, _, _ = saved
    with pytest.raises(CheckpointNotFoundError, match=r"nomap\.txt"):
        reckpt.restore_model(ckpt, fresh()[0], ckpt_param_map_path=str(tmp_path / "nomap.txt"))


def test_shape_mismatch_names_key_and_shapes_before_loading(saved) -> None:
    ckpt, _, _ = saved
    m2, _ = fresh(dim=6)
    before = {k: v.clone() for k, v in m2.state_dict().items()}
    with pytest.raises(ShapeMismatchError, match=r"emb\.user\.weight.*\[50, 4\].*\[50, 6\]"):
        reckpt.restore_model(ckpt, m2, strict_shapes=True)
    assert state_dicts_equal(before, m2.state_dict())


@pytest.mark.parametrize("rows", [30, 80])
@pytest.mark.parametrize(
    "flags", [{}, {"allow_row_resize": True}, {"allow_row_resize": True, "strict_shapes": True}]
)
def test_row_resize_loads_overlap(saved, rows, flags) -> None:
    """The default, the old opt-in flag (now implied) and its strict-mode exception agree."""
    ckpt, m, _ = saved
    m2, _ = fresh(rows=rows)
    with pytest.raises(ShapeMismatchError, match="strict_shapes=True refuses"):
        reckpt.restore_model(ckpt, m2, strict_shapes=True)
    init = m2.emb["user"].weight.detach().clone()
    report = reckpt.restore_model(ckpt, m2, **flags)
    n = min(rows, 50)
    assert torch.equal(m2.emb["user"].weight[:n], m.emb["user"].weight[:n])
    assert torch.equal(m2.emb["user"].weight[n:], init[n:])
    assert report.part("model").resized == ["emb.user.weight"]


def test_weights_only_flag(saved) -> None:
    ckpt, m, _ = saved
    m2, o2 = fresh()
    report = reckpt.restore_model(ckpt, m2, o2, load_optimizer=False)
    assert state_dicts_equal(m.state_dict(), m2.state_dict())
    assert o2.state == {} and report.part("optimizer").skipped == "load_optimizer=False"


def test_optimizer_state_initialised_without_data_or_weight_change(saved) -> None:
    """A never-stepped optimizer restores fully; init does not move weights or use data."""
    from reckpt.optim import init_optimizer_state

    m2, o2 = fresh()
    before = {k: v.clone() for k, v in m2.state_dict().items()}
    created = init_optimizer_state(o2)
    assert len(created) == 5 and state_dicts_equal(before, m2.state_dict())
    assert all(p.grad is None for p in m2.parameters())
    ckpt, _, o = saved
    m3, o3 = fresh()
    reckpt.restore_model(ckpt, m3, o3)
    assert optim_states_equal(o, o3)


def test_ec_list_to_ec_dict_rule_matches_whole_segments(tmp_path) -> None:
    sd = {
        "grp.ec_list.0.embeddings.t.weight": torch.randn(5, 16),
        "grp.ec_list.1.embeddings.u.weight": torch.randn(5, 160),
    }
    dcp.save(sd, checkpoint_id=str(tmp_path / "model.ckpt-0" / "model"), no_dist=True)

    class New(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.grp = torch.nn.Module()
            self.grp.ec_dict = torch.nn.ModuleDict(
                {
                    "16": torch.nn.Module(),
                    "160": torch.nn.Module(),
                }
            )
            self.grp.ec_dict["16"].embeddings = torch.nn.ModuleDict({"t": torch.nn.Embedding(5, 16)})
            self.grp.ec_dict["160"].embeddings = torch.nn.ModuleDict({"u": torch.nn.Embedding(5, 160)})

    new = New()
    report = reckpt.restore_model(str(tmp_path / "model.ckpt-0"), new)
    assert torch.equal(new.grp.ec_dict["16"].embeddings["t"].weight, sd["grp.ec_list.0.embeddings.t.weight"])
    assert torch.equal(new.grp.ec_dict["160"].embeddings["u"].weight, sd["grp.ec_list.1.embeddings.u.weight"])
    assert report.legacy and len(report.part("model").remapped) == 2


def test_input_tile_rule(tmp_path, monkeypatch) -> None:
    sd = {"group.ebc.embedding_bags.table.weight": torch.randn(4, 2)}
    dcp.save(sd, checkpoint_id=str(tmp_path / "model.ckpt-0" / "model"), no_dist=True)

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.group = torch.nn.Module()
            self.group.ebc_user = torch.nn.Module()
            self.group.ebc_user.embedding_bags = torch.nn.ModuleDict({"table": torch.nn.Embedding(4, 2)})

    m = M()
    with pytest.raises(KeyMismatchError, match="none of the model's 1 keys is in this checkpoint"):
        reckpt.restore_model(str(tmp_path / "model.ckpt-0"), m)  # without the rule: nothing matches
    assert not torch.equal(
        m.group.ebc_user.embedding_bags["table"].weight, sd["group.ebc.embedding_bags.table.weight"]
    )
    monkeypatch.setenv("INPUT_TILE", "3")
    reckpt.restore_model(str(tmp_path / "model.ckpt-0"), m)
    assert torch.equal(
        m.group.ebc_user.embedding_bags["table"].weight, sd["group.ebc.embedding_bags.table.weight"]
    )


def test_legacy_index_keyed_tzrec_checkpoint_restores_with_optimizer(tmp_path) -> None:
    """A TorchEasyRec checkpoint written by plain DCP: positional optimizer keys, no manifest."""
    m, o = trained()
    ckpt = tmp_path / "model.ckpt-7"
    dcp.save(m.state_dict(), checkpoint_id=str(ckpt / "model"), no_dist=True)
    dcp.save(o.state_dict(), checkpoint_id=str(ckpt / "optimizer"), no_dist=True)
    assert reckpt.is_committed(str(ckpt))
    assert reckpt.latest_checkpoint(str(tmp_path)) == (str(ckpt), 7)
    m2, o2 = fresh()
    report = reckpt.restore_model(str(ckpt), m2, o2)
    assert report.legacy and not report.verified
    assert state_dicts_equal(m.state_dict(), m2.state_dict())
    assert optim_states_equal(o, o2)
    assert o2.param_groups[0]["lr"] == 0.05
    assert report.part("optimizer").remapped["state.emb.user.weight.exp_avg"] == "state.0.exp_avg"
    assert reckpt.verify(str(ckpt)).ok


class DenseEMA:
    """A minimal Dense EMA with TorchEasyRec's interface (reset, state_dict with a count)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.avg = {n: p.detach().clone() for n, p in model.named_parameters() if "tower" in n}
        self.n = torch.zeros((), dtype=torch.int64)

    def reset(self) -> None:
        self.avg = {n: p.detach().clone() for n, p in self.model.named_parameters() if "tower" in n}
        self.n.zero_()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.avg, "__n_averaged__": self.n}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.n = sd.pop("__n_averaged__")
        self.avg = dict(sd)


def test_dense_ema_resume_and_overlay(tmp_path) -> None:
    m, o = trained()
    ema = DenseEMA(m)
    for v in ema.avg.values():
        v.fill_(3.0)
    ema.n.fill_(2)
    ckpt = str(tmp_path / "model.ckpt-1")
    reckpt.save_model(ckpt, m, o, dense_ema=ema)
    assert os.path.isdir(tmp_path / "model.ckpt-1" / "dense_ema")
    m2, o2 = fresh()
    ema2 = DenseEMA(m2)
    reckpt.restore_model(ckpt, m2, o2, dense_ema=ema2)
    assert int(ema2.n) == 2 and all(torch.all(v == 3.0) for v in ema2.avg.values())
    assert state_dicts_equal(m.state_dict(), m2.state_dict())
    m3, _ = fresh()
    reckpt.restore_model(ckpt, m3, use_dense_ema=True)
    assert torch.all(m3.tower[0].weight == 3.0)
    assert torch.equal(m3.emb["user"].weight, m.emb["user"].weight)


def test_restore_without_ema_dir_warns(saved) -> None:
    ckpt, _, _ = saved
    m2, _ = fresh()
    ema = DenseEMA(m2)
    report = reckpt.restore_model(ckpt, m2, dense_ema=ema)
    assert "EMA will restart" in report.part("dense_ema").skipped
    assert int(ema.n) == 0


@pytest.mark.parametrize("strict", [True, False])
def test_every_part_is_checked_before_any_is_loaded(tmp_path, strict) -> None:
    """A mismatch in an extra state stops the restore before the model is touched."""
    m, o = trained()
    ckpt = str(tmp_path / "model.ckpt-1")
    reckpt.save_model(ckpt, m, o, extra_states={"head": torch.nn.Linear(3, 2)})
    m2, o2 = fresh()
    before = {k: v.clone() for k, v in m2.state_dict().items()}
    # strict: any shape change; default: a change in the number of dimensions
    head = torch.nn.Linear(3, 4) if strict else torch.nn.Bilinear(3, 3, 2)
    want = r"\[2, 3\].*\[4, 3\]" if strict else r"\[2, 3\].*\[2, 3, 3\]"
    with pytest.raises(ShapeMismatchError, match=rf"(?s)head.*weight.*{want}"):
        reckpt.restore_model(ckpt, m2, o2, extra_states={"head": head}, strict_shapes=strict)
    assert state_dicts_equal(before, m2.state_dict())
    assert o2.state == {} or all(float(v["exp_avg"].abs().sum()) == 0 for v in o2.state.values())


def test_meta_load_model_false_skips_model(tmp_path) -> None:
    m, o = trained()
    ckpt = tmp_path / "model.ckpt-0"
    reckpt.save_model(str(ckpt), m, o, meta={"load_model": False})
    m2, o2 = fresh()
    before = {k: v.clone() for k, v in m2.state_dict().items()}
    report = reckpt.restore_model(str(ckpt), m2, o2)
    assert state_dicts_equal(before, m2.state_dict())
    assert report.part("model").skipped == "meta.load_model is false"
    assert optim_states_equal(o, o2)


def test_partial_load_planner_with_plain_dcp(saved) -> None:
    """TorchEasyRec-style use: PartialLoadPlanner handed straight to dcp.load."""
    ckpt, m, _ = saved
    m2, _ = fresh(extra=True)
    sd = m2.state_dict()
    planner = reckpt.PartialLoadPlanner()
    dcp.load(sd, checkpoint_id=os.path.join(ckpt, "model"), planner=planner, no_dist=True)
    assert planner.skipped_keys == ["extra.bias", "extra.weight"]
    m2.load_state_dict(sd)
    assert torch.equal(m2.emb["user"].weight, m.emb["user"].weight)
