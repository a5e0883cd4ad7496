"""Corruption: a flipped bit or a truncation in every kind of file is caught, and the file named.

``verify`` and ``restore_model`` name the damaged file (a damaged metrics sidecar is named by
``verify`` and warned about by restore, which still loads the weights); the eval results file,
which is appended to and carries no checksum, is cross-checked against the metrics sidecars;
resuming falls back to the newest checkpoint that verifies and logs why.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from benchmarks.kill_harness import Tiny, model_at
from benchmarks.reliability_checks import WarningRecords, detect, flip_bit, pristine_checkpoint, truncate_half

import reckpt
from reckpt.errors import IntegrityError
from reckpt.format.eval_results import TRAIN_EVAL_RESULT_FILENAME, cross_check_eval_results
from reckpt.storage.core import storage_for

FILES = [
    "model/__0_0.distcp",
    "model/.metadata",
    "optimizer/__0_0.distcp",
    "optimizer/.metadata",
    "lr_scheduler/__0_0.distcp",
    "lr_scheduler/.metadata",
    "reckpt.json",
    "plan",
    "meta",
    "dataloader_state.json",
    "reckpt.metrics.sidecar.json",
    f"../{TRAIN_EVAL_RESULT_FILENAME}",
]


def test_the_pristine_checkpoint_has_every_kind_of_file(tmp_path: Path) -> None:
    ckpt = pristine_checkpoint(str(tmp_path), 7)
    present = {os.path.relpath(os.path.join(d, f), ckpt) for d, _, fs in os.walk(ckpt) for f in fs}
    assert present == {f for f in FILES if not f.startswith("..")}
    assert (
        reckpt.verify(ckpt).ok and cross_check_eval_results(storage_for(str(tmp_path)), str(tmp_path)) == []
    )


@pytest.mark.parametrize("damage", ["flip", "truncate"])
@pytest.mark.parametrize("rel", FILES)
def test_damage_is_detected_and_the_file_named(tmp_path: Path, rel: str, damage: str) -> None:
    root = str(tmp_path)
    pristine_checkpoint(root, 7)
    target = os.path.normpath(os.path.join(root, "model.ckpt-7", rel))
    (flip_bit if damage == "flip" else truncate_half)(target)
    handler = WarningRecords()
    logging.getLogger("reckpt").addHandler(handler)
    try:
        how = detect(root, os.path.basename(target), handler)
    finally:
        logging.getLogger("reckpt").removeHandler(handler)
    expected = {
        "reckpt.metrics.sidecar.json": "verify+restore warning",
        TRAIN_EVAL_RESULT_FILENAME: "cross-check",
    }.get(os.path.basename(target), "verify+restore")
    assert how == expected


def test_results_file_cross_check_names_lost_and_altered_steps(tmp_path: Path) -> None:
    root = str(tmp_path)
    for step in (1, 2):
        pristine_checkpoint(root, step)
    results = tmp_path / TRAIN_EVAL_RESULT_FILENAME
    lines = results.read_text().splitlines()
    results.write_text(lines[0].replace("0.51", "0.91") + "\n")  # step 1 altered, step 2 lost
    problems = cross_check_eval_results(storage_for(root), root)
    assert problems == [
        f"{results}: step 1 says {{'auc': 0.91}}, but model.ckpt-1's metrics sidecar says {{'auc': 0.51}}"
        " (altered)",
        f"{results}: no result for step 2, but model.ckpt-2's metrics sidecar records {{'auc': 0.52}}"
        " (lines lost or truncated)",
    ]


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = str(tmp_path)
    for step in (1, 2, 3):
        pristine_checkpoint(root, step)
    flip_bit(str(tmp_path / "model.ckpt-3" / "model" / "__0_0.distcp"))
    truncate_half(str(tmp_path / "model.ckpt-2" / "reckpt.json"))
    m = Tiny()
    o = torch.optim.Adam(m.parameters())
    with caplog.at_level(logging.WARNING, logger="reckpt"), reckpt.CheckpointManager(root) as mgr:
        info = mgr.restore_latest(m, o)
    assert info is not None and info.step == 1 and info.path == f"{root}/model.ckpt-1"
    want, _ = model_at(1)
    assert all(
        torch.equal(a, b) for a, b in zip(m.state_dict().values(), want.state_dict().values(), strict=True)
    )
    skipped = [r.getMessage() for r in caplog.records if "resume: skipping" in r.getMessage()]
    assert len(skipped) == 2
    assert "model.ckpt-3" in skipped[0] and "model/__0_0.distcp" in skipped[0]
    assert "model.ckpt-2" in skipped[1] and "reckpt.json" in skipped[1]


def test_resume_with_every_checkpoint_damaged_raises_the_newest_error(tmp_path: Path) -> None:
    root = str(tmp_path)
    pristine_checkpoint(root, 1)
    flip_bit(str(tmp_path / "model.ckpt-1" / "optimizer" / "__0_0.distcp"))
    m = Tiny()
    with (
        reckpt.CheckpointManager(root) as mgr,
        pytest.raises(IntegrityError, match=r"optimizer/__0_0\.distcp"),
    ):
        mgr.restore_latest(m, torch.optim.Adam(m.parameters()))
    with reckpt.CheckpointManager(str(tmp_path / "empty")) as mgr:
        assert mgr.restore_latest(m) is None
