"""Reads that export a checkpoint's values check them first; the CLI's everyday rough edges."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import reckpt
from tests.helpers import flip_bit, trained
from tests.helpers.processes import reckpt_cli


def test_convert_refuses_a_damaged_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "run" / "model.ckpt-1"
    reckpt.save_model(str(ckpt), *trained())
    assert reckpt_cli("convert", str(ckpt), str(tmp_path / "good.safetensors")).returncode == 0
    flip_bit(ckpt)
    out = reckpt_cli("convert", str(ckpt), str(tmp_path / "w.safetensors"))
    assert out.returncode != 0
    assert "integrity check failed" in out.stderr and "--no-verify" in out.stderr, out.stderr
    assert not (tmp_path / "w.safetensors").exists()
    salvage = reckpt_cli("convert", str(ckpt), str(tmp_path / "w.safetensors"), "--no-verify")
    assert salvage.returncode == 0, salvage.stderr
    assert (tmp_path / "w.safetensors").stat().st_size == (tmp_path / "good.safetensors").stat().st_size


def test_a_closed_pipe_is_not_an_error(tmp_path: Path) -> None:
    """``reckpt ls DIR | head``: the reader leaving early ends the command quietly with 0."""
    for step in range(3):
        reckpt.save_model(str(tmp_path / f"model.ckpt-{step}"), *trained())
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the command writes anything
    proc = subprocess.run(
        [sys.executable, "-m", "reckpt.cli", "ls", str(tmp_path)],
        stdout=w,
        stderr=subprocess.PIPE,
        text=True,
        timeout=300,
    )
    os.close(w)
    assert proc.returncode == 0, proc.stderr
    assert "Broken pipe" not in proc.stderr and "Traceback" not in proc.stderr


def test_read_part_verifies_unless_told_not_to(tmp_path: Path) -> None:
    import pytest

    from reckpt.errors import IntegrityError
    from reckpt.restore.inspection import read_part

    ckpt = tmp_path / "model.ckpt-1"
    reckpt.save_model(str(ckpt), *trained())
    assert set(read_part(str(ckpt), "model")) == set(trained()[0].state_dict())
    flip_bit(ckpt)
    with pytest.raises(IntegrityError, match=r"(?s)model/__0_0\.distcp: checksum .*--no-verify"):
        read_part(str(ckpt), "model")
    assert set(read_part(str(ckpt), "model", verify=False)) == set(trained()[0].state_dict())


def test_diff_verifies_both_checkpoints_once(tmp_path: Path) -> None:
    a, b = tmp_path / "model.ckpt-1", tmp_path / "model.ckpt-2"
    reckpt.save_model(str(a), *trained(seed=1))
    reckpt.save_model(str(b), *trained(seed=2))
    assert reckpt_cli("diff", str(a), str(b)).returncode == 0
    flip_bit(b)
    out = reckpt_cli("diff", str(a), str(b))
    assert out.returncode != 0 and "Refusing to compare a damaged checkpoint" in out.stderr, out.stderr
    assert reckpt_cli("diff", str(a), str(b), "--no-verify").returncode == 0


def test_eval_and_export_need_no_config_when_train_did_not(tmp_path: Path) -> None:
    """`reckpt train` runs the demo without a config; eval and export take the same default."""
    for args in (["eval"], ["export", "--export-dir", "serving"]):
        out = reckpt_cli(*args, "--model-dir", "./model_dir", cwd=tmp_path)
        assert out.returncode != 0
        assert "required: config" not in out.stderr
        assert "model_dir ./model_dir: no committed checkpoint" in out.stderr, out.stderr
