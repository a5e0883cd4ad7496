"""`reckpt` checkpoint commands as subprocesses: exit codes, --json, --help, pty progress, speed."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

import reckpt
from tests.helpers import trained
from tests.helpers.processes import child_env, reckpt_cli, run_python


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli") / "run"
    m, o = trained()
    mgr = reckpt.CheckpointManager(str(root))
    for step, auc in ((10, 0.70), (20, 0.80), (30, 0.75)):
        with torch.no_grad():
            m.tower[0].weight.add_(0.01 * step)
        mgr.save(step, m, o)
        mgr.record_eval(step, {"auc": auc, "logloss": 1 - auc})
    mgr.close()
    return root


def test_ls_json_markers_and_no_torch_import(run_dir: Path) -> None:
    proc = reckpt_cli("ls", str(run_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    rows = {r["step"]: r for r in doc["checkpoints"]}
    assert sorted(rows) == [10, 20, 30]
    assert rows[20]["markers"] == ["best"] and rows[30]["markers"] == ["latest"]
    assert rows[10]["metrics"] == {"auc": 0.7, "logloss": pytest.approx(0.3)} and rows[10]["size_bytes"] > 0
    code = (
        f"import sys; from reckpt.cli import main; main(['ls', {str(run_dir)!r}]);"
        " print('torch' in sys.modules)"
    )
    out = run_python("-c", code, timeout=60)
    assert out.stdout.strip().endswith("False"), out.stdout + out.stderr  # ls never imports torch


def test_inspect_verify_latest_best(run_dir: Path) -> None:
    ck = str(run_dir / "model.ckpt-20")
    doc = json.loads(reckpt_cli("inspect", ck, "--json").stdout)
    names = {e["name"]: e for e in doc["parts"]["model"]}
    assert names["emb.user.weight"]["shape"] == [50, 4] and names["emb.user.weight"]["bytes"] == 800
    assert "optimizer" in doc["parts"] and "train_state" in doc["parts"]
    assert json.loads(reckpt_cli("verify", str(run_dir), "--json").stdout)["ok"] is True
    assert json.loads(reckpt_cli("latest", str(run_dir), "--json").stdout)["step"] == 30
    assert reckpt_cli("best", str(run_dir)).stdout.strip() == ck
    proc = reckpt_cli("best", str(run_dir), "--metric", "logloss", "--smaller-is-better")
    assert proc.stdout.strip() == ck
    proc = reckpt_cli("best", str(run_dir), "--metric", "ndcg")
    assert (
        proc.returncode == 2
        and "'ndcg' is not recorded" in proc.stderr
        and len(proc.stderr.splitlines()) == 1
    )


def test_verify_reports_corruption_with_exit_1(tmp_path: Path) -> None:
    m, _ = trained()
    ck = tmp_path / "model.ckpt-1"
    reckpt.save_model(str(ck), m)
    data = next((ck / "model").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:-3])
    proc = reckpt_cli("verify", str(ck))
    assert proc.returncode == 1 and "FAIL" in proc.stdout and data.name in proc.stdout


def test_diff_json(run_dir: Path, tmp_path: Path) -> None:
    proc = reckpt_cli("diff", str(run_dir / "model.ckpt-10"), str(run_dir / "model.ckpt-20"), "--json")
    doc = json.loads(proc.stdout)
    changed = {r["name"]: r for r in doc["changed"]}
    assert changed["model/tower.0.weight"]["max_abs"] == pytest.approx(0.2, abs=1e-5)
    assert changed["model/emb.user.weight"]["equal"] is True
    assert doc["added"] == doc["removed"] == [] and doc["reshaped"] == []
    other = tmp_path / "model.ckpt-1"
    reckpt.save_model(str(other), trained(rows=60, extra=True)[0])
    doc = json.loads(reckpt_cli("diff", str(run_dir / "model.ckpt-10"), str(other), "--json").stdout)
    assert "model/extra.weight" in doc["added"] and doc["reshaped"][0]["name"] == "model/emb.user.weight"


def test_convert_roundtrip(run_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from reckpt.restore.inspection import read_part

    ck = str(run_dir / "model.ckpt-20")
    want = read_part(ck, "model")
    assert reckpt_cli("convert", ck, str(tmp_path / "m.safetensors")).returncode == 0
    got = load_file(str(tmp_path / "m.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert reckpt_cli("convert", ck, str(tmp_path / "m.pt")).returncode == 0
    pt = torch.load(tmp_path / "m.pt", weights_only=True)
    assert all(torch.equal(pt[k], want[k]) for k in want)
    back = tmp_path / "back" / "model.ckpt-0"
    assert reckpt_cli("convert", str(tmp_path / "m.pt"), str(back)).returncode == 0
    assert reckpt.verify(str(back)).ok
    again = read_part(str(back), "model")
    assert all(torch.equal(again[k], want[k]) for k in want)


def test_prune_dry_run_then_real(tmp_path: Path, run_dir: Path) -> None:
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(run_dir, root)
    proc = reckpt_cli("prune", str(root), "--keep-last", "1", "--keep-best", "auc", "--dry-run", "--json")
    assert json.loads(proc.stdout)["would_delete"] == [str(root / "model.ckpt-10")]
    assert sorted(p.name for p in root.glob("model.ckpt-*")) == [
        "model.ckpt-10",
        "model.ckpt-20",
        "model.ckpt-30",
    ]
    assert reckpt_cli("prune", str(root), "--keep-last", "1", "--keep-best", "auc").returncode == 0
    assert sorted(p.name for p in root.glob("model.ckpt-*")) == ["model.ckpt-20", "model.ckpt-30"]
    assert reckpt_cli("prune", str(root)).returncode == 2  # no policy given


def test_plot(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.png"
    proc = reckpt_cli("plot", str(run_dir), "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc == {
        "metric": "auc",
        "steps": [10, 20, 30],
        "values": [0.7, 0.8, 0.75],
        "checkpoints": [10, 20, 30],
        "best_step": 20,
    }
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


@pytest.mark.parametrize(
    "args",
    [
        ["ls", "/nonexistent/run"],
        ["inspect", "/nonexistent/model.ckpt-1"],
        ["verify", "/nonexistent"],
        ["latest", "/nonexistent"],
        ["diff", "/nonexistent/a", "/nonexistent/b"],
        ["convert", "/nonexistent", "x.pt"],
    ],
)
def test_missing_input_is_an_error(args: list[str]) -> None:
    proc = reckpt_cli(*args)
    assert proc.returncode != 0 and proc.stderr.startswith(f"reckpt {args[0]}: error: ")
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "command", ["ls", "inspect", "verify", "diff", "convert", "prune", "latest", "best", "plot", "train"]
)
def test_help_has_an_example(command: str) -> None:
    proc = reckpt_cli(command, "--help")
    assert proc.returncode == 0 and "example" in proc.stdout


def test_progress_bar_under_a_pty(run_dir: Path) -> None:
    import pty

    env = child_env()
    pid, fd = pty.fork()
    if pid == 0:  # the child: stderr is the pty
        os.execve(sys.executable, [sys.executable, "-m", "reckpt.cli", "verify", str(run_dir)], env)
    chunks = []
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    out = b"".join(chunks).decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0
    assert "verify:" in out and ("it/s" in out or "s/it" in out), out


def test_urls_work_like_paths(s3_root: str) -> None:
    """moto's S3 server; credentials and endpoint reach the subprocess through AWS_* variables."""
    m, o = trained()
    mgr = reckpt.CheckpointManager(s3_root)
    mgr.save(5, m, o)
    mgr.record_eval(5, {"auc": 0.6})
    mgr.close()
    doc = json.loads(reckpt_cli("ls", s3_root, "--json").stdout)
    assert [(r["step"], r["markers"]) for r in doc["checkpoints"]] == [(5, ["latest", "best"])]
    assert json.loads(reckpt_cli("verify", s3_root, "--json").stdout)["ok"] is True
    inspected = json.loads(reckpt_cli("inspect", f"{s3_root}/model.ckpt-5", "--json").stdout)
    assert "model" in inspected["parts"]


def test_verify_model_dir_cross_checks_the_eval_results(tmp_path: Path) -> None:
    root = tmp_path / "run"
    m, o = trained()
    with reckpt.CheckpointManager(str(root)) as mgr:
        for step, auc in ((1, 0.61), (2, 0.72)):
            mgr.save(step, m, o)
            mgr.record_eval(step, {"auc": auc})
    proc = reckpt_cli("verify", str(root), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["eval_results"] == {"ok": True, "problems": []}
    results = root / "train_eval_result_v2.txt"
    results.write_text(results.read_text().replace("0.72", "0.92"))  # a flipped digit
    proc = reckpt_cli("verify", str(root))
    assert proc.returncode == 1 and "FAIL eval results" in proc.stdout and "0.92" in proc.stdout
