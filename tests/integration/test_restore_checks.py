"""A restore does what was asked, or says why not: map lines are commands, and a restore that
matches nothing (another model's checkpoint) is an error."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import reckpt
from reckpt.errors import KeyMismatchError, ParamMapError
from tests.helpers import TinyRec, fresh, state_dicts_equal, trained


def _saved(tmp_path: Path) -> tuple[str, torch.nn.Module]:
    m, o = trained()
    return reckpt.save_model(str(tmp_path / "model.ckpt-1"), m, o), m


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (
            "emb.item.weight emb.user.weight",
            r"the current model has no 'emb\.item\.weight' \(did you mean 'emb\.user\.weight'\?\)",
        ),
        (
            "emb.user.weight emb.usr.weight",
            r"the checkpoint has no 'emb\.usr\.weight' \(did you mean 'emb\.user\.weight'\?\)",
        ),
    ],
    ids=["current-side typo", "checkpoint-side typo"],
)
def test_a_map_line_naming_nothing_is_an_error(tmp_path: Path, line: str, why: str) -> None:
    ckpt, _ = _saved(tmp_path)
    (tmp_path / "map.txt").write_text(line + "\n")
    m, o = fresh()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ParamMapError, match=why):
        reckpt.restore_model(ckpt, m, o, str(tmp_path / "map.txt"))
    assert state_dicts_equal(m.state_dict(), before)  # refused before anything was loaded
    report = reckpt.restore_model(ckpt, m, o, str(tmp_path / "map.txt"), lenient_param_map=True)
    assert report.part("model").loaded  # TorchEasyRec's warn-and-skip, asked for explicitly


def test_a_restore_matching_no_key_is_an_error(tmp_path: Path) -> None:
    ckpt, _ = _saved(tmp_path)
    other = torch.nn.Sequential(torch.nn.Linear(3, 3))
    want = (
        r"none of the model's 2 keys is in this checkpoint \(model keys such as \['0\.bias', '0\.weight'\],"
        r" checkpoint keys such as \['emb\.user\.weight'"
    )
    with pytest.raises(KeyMismatchError, match=want):
        reckpt.restore_model(ckpt, other)


def test_a_restore_matching_under_half_warns_loudly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt, saved = _saved(tmp_path)

    class Wider(TinyRec):
        def __init__(self) -> None:
            super().__init__()
            self.heads = torch.nn.ModuleList(torch.nn.Linear(1, 1) for _ in range(4))

    m = Wider()
    with caplog.at_level(logging.WARNING):
        reckpt.restore_model(ckpt, m)
    assert "only 5 of the model's 13 keys are in this checkpoint" in caplog.text
    assert torch.equal(m.emb["user"].weight, saved.emb["user"].weight)  # the partial load happened
