"""Delta checkpoints on a plain model: a chain restores bitwise equal to a full checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import reckpt
from reckpt import errors
from reckpt.delta.row_tracker import RowTracker
from reckpt.delta.save import save_delta
from reckpt.errors import CheckpointNotFoundError, ConfigError, IntegrityError
from reckpt.format.manifest import read_manifest
from reckpt.storage.core import Storage, storage_for
from tests.helpers import TinyRec, flip_byte, state_dicts_equal, train
from tests.helpers.models import adagrad, flat_training_state
from tests.helpers.processes import reckpt_cli

TABLE = "emb.user.weight"


def _chain(root: str, encoding: str = "raw") -> tuple[dict[str, Any], str]:
    """Full at step 3, deltas at 5 and 7; returns the state at step 7 and the newest delta."""
    torch.manual_seed(0)
    m = TinyRec(rows=50)
    o = adagrad(m)
    tracker = RowTracker(m, tables=[TABLE])
    train(m, o, steps=3, seed=1)
    base = reckpt.save_model(Storage.join(root, "model.ckpt-3"), m, o)
    tracker.clear()
    train(m, o, steps=2, seed=2)
    d5 = Storage.join(root, "model.delta-5")
    rows = save_delta(d5, m, o, tracker, base)
    assert 0 < rows[TABLE] < 50
    tracker.clear()
    train(m, o, steps=2, seed=3)
    d7 = Storage.join(root, "model.delta-7")
    save_delta(d7, m, o, tracker, d5, encoding=encoding)
    return flat_training_state(m, o), d7


def _fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(123)
    m = TinyRec(rows=50)
    return m, adagrad(m)


def _refused_untouched(d7: str, error: type[Exception], match: str) -> None:
    """Restoring ``d7`` into a fresh model raises ``error`` and changes none of the model."""
    m, o = _fresh()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(error, match=match):
        reckpt.restore_model(d7, m, o)
    assert state_dicts_equal(m.state_dict(), before)


def test_chain_restores_bitwise_equal_to_the_state_at_its_step(root: str) -> None:
    want, d7 = _chain(root)
    m, o = _fresh()
    report = reckpt.restore_model(d7, m, o)
    assert state_dicts_equal(flat_training_state(m, o), want)
    assert TABLE not in report.missing_keys
    assert any("model.ckpt-3" in n and "model.delta-5" in n for n in report.notes)
    manifest = read_manifest(storage_for(d7), d7)
    assert manifest is not None and manifest.delta is not None
    assert manifest.delta["chain"] == ["model.ckpt-3", "model.delta-5"]
    assert reckpt.latest_checkpoint(root)[1] == 3  # TorchEasyRec's view: deltas are not checkpoints


def test_delta_is_much_smaller_than_a_full_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = TinyRec(rows=20000, dim=16)
    o = adagrad(m)
    tracker = RowTracker(m, tables=[TABLE])
    base = reckpt.save_model(str(tmp_path / "model.ckpt-1"), m, o)
    train(m, o, steps=1, seed=4)  # ids < 50: a handful of rows
    save_delta(str(tmp_path / "model.delta-2"), m, o, tracker, base)
    size = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())  # noqa: E731
    assert size(tmp_path / "model.delta-2") * 20 < size(tmp_path / "model.ckpt-1")


def test_missing_link_is_named_and_nothing_is_loaded(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    _, d7 = _chain(root)
    storage_for(root).rm(str(tmp_path / "run" / "model.delta-5"), recursive=True)
    _refused_untouched(d7, CheckpointNotFoundError, r"chain is broken: link .*model\.delta-5 does not exist")


def test_corrupt_link_is_named_and_nothing_is_loaded(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _, d7 = _chain(str(root))
    flip_byte(root / "model.delta-5" / "delta_rows" / "rank_0.bin", at=3, mask=0x10)
    corrupt = r"model\.delta-5/delta_rows/rank_0\.bin: delta rows file is corrupted"
    _refused_untouched(d7, IntegrityError, corrupt)


def test_lossy_delta_needs_consent_and_stays_within_the_int8_bound(tmp_path: Path) -> None:
    want, d7 = _chain(str(tmp_path / "run"), encoding="int8")
    m, o = _fresh()
    with pytest.raises(ConfigError, match=r"lossy .*int8.* delta dump; pass allow_lossy=True"):
        reckpt.restore_model(d7, m, o)
    reckpt.restore_model(d7, m, o, allow_lossy=True)
    got = m.state_dict()["emb.user.weight"]
    exact = want["model/emb.user.weight"]
    spread = (exact.max(dim=1).values - exact.min(dim=1).values).max()
    assert float((got - exact).abs().max()) <= float(spread) / 255  # about half a step, plus fp16
    assert not torch.equal(got, exact)


def test_bad_delta_arguments(tmp_path: Path) -> None:
    m, o = _fresh()
    tracker = RowTracker(m, tables=[TABLE])
    base = reckpt.save_model(str(tmp_path / "model.ckpt-1"), m, o)
    with pytest.raises(ConfigError, match=r"must be named model\.delta-<step>"):
        save_delta(str(tmp_path / "model.ckpt-2"), m, o, tracker, base)
    with pytest.raises(ConfigError, match="delta encoding must be one of"):
        save_delta(str(tmp_path / "model.delta-2"), m, o, tracker, base, encoding="int4")
    with pytest.raises(CheckpointNotFoundError, match=r"delta parent .* is not a committed"):
        save_delta(str(tmp_path / "model.delta-2"), m, o, tracker, str(tmp_path / "model.ckpt-9"))
    with pytest.raises(ConfigError, match="name no embedding table"):
        RowTracker(m, tables=["nope.weight"])
    assert not (tmp_path / "model.delta-2").exists()


def test_manager_alternates_full_and_delta_and_retention_keeps_the_chain(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    policy = reckpt.delta.IncrementalPolicy(full_every=2, tables=(TABLE,))
    torch.manual_seed(0)
    m = TinyRec(rows=5000)
    o = adagrad(m)
    with reckpt.CheckpointManager(root, keep_checkpoint_max=2, incremental=policy) as mgr:
        paths = []
        for step in range(1, 7):
            train(m, o, steps=1, seed=step)
            paths.append(mgr.save(step, m, o))
        mgr.prune()
        mgr.wait()
    names = [Path(p).name for p in paths]
    assert names == [
        "model.ckpt-1",
        "model.delta-2",
        "model.delta-3",
        "model.ckpt-4",
        "model.delta-5",
        "model.delta-6",
    ]
    infos = reckpt.list_checkpoints(root)
    kinds = [(c.step, c.kind, c.needs) for c in infos]
    assert kinds == [(4, "full", ()), (5, "delta", (4,)), (6, "delta", (4, 5))]
    want = flat_training_state(m, o)

    torch.manual_seed(9)
    m2 = TinyRec(rows=5000)
    o2 = adagrad(m2)
    with reckpt.CheckpointManager(root, keep_checkpoint_max=2, incremental=policy) as mgr:
        path, step = mgr.latest_checkpoint()
        assert (Path(path or "").name, step) == ("model.delta-6", 6)
        info = mgr.restore(path or "", m2, o2)
        assert info.step == 6
        assert state_dicts_equal(flat_training_state(m2, o2), want)
        train(m2, o2, steps=1, seed=7)
        assert Path(mgr.save(7, m2, o2)).name == "model.ckpt-7"  # two deltas on 4 already


def test_verify_and_the_cli_understand_deltas(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _, d7 = _chain(str(root))
    assert reckpt.verify(d7).ok
    proc = reckpt_cli("ls", str(root), "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["step"]: r for r in json.loads(proc.stdout)["checkpoints"]}
    assert (rows[3]["kind"], rows[5]["kind"], rows[7]["needs"]) == ("full", "delta", [3, 5])
    assert "delta(base 3)" in rows[7]["markers"]
    assert reckpt_cli("verify", d7).returncode == 0
    proc = reckpt_cli("inspect", d7, "--json")
    assert proc.returncode == 0, proc.stderr
    link = json.loads(proc.stdout)["delta"]
    assert link["chain"] == ["model.ckpt-3", "model.delta-5"] and 0 < link["rows"][TABLE] < 50
    f = root / "model.ckpt-3" / "model" / "__0_0.distcp"
    f.write_bytes(f.read_bytes()[:-4])
    report = reckpt.verify(d7)
    bad = "model.ckpt-3/model/__0_0.distcp"
    assert any(p.startswith("chain link: ") and bad in p for p in report.problems)
    proc = reckpt_cli("verify", d7)
    assert proc.returncode != 0 and "chain link" in proc.stdout + proc.stderr


def test_corrupt_dense_part_of_the_delta_is_found_before_the_base_is_loaded(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _, d7 = _chain(str(root))
    flip_byte(root / "model.delta-7" / "model" / "__0_0.distcp", at=-9)
    _refused_untouched(d7, IntegrityError, r"model\.delta-7: integrity check failed")


def test_eval_metrics_of_a_delta_go_to_its_sidecar_and_best_can_pick_it(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    torch.manual_seed(0)
    m = TinyRec(rows=5000)
    o = adagrad(m)
    with reckpt.CheckpointManager(root, incremental=reckpt.delta.IncrementalPolicy(tables=(TABLE,))) as mgr:
        for step, auc in ((1, 0.6), (2, 0.9), (3, 0.7)):
            train(m, o, steps=1, seed=step)
            mgr.save(step, m, o)
            mgr.record_eval(step, {"auc": auc})
    best, step = reckpt.best_checkpoint(root)
    assert (Path(best or "").name, step) == ("model.delta-2", 2)
    sidecar = Path(root) / "model.delta-2" / "reckpt.metrics.sidecar.json"
    assert sidecar.exists() and "0.9" in sidecar.read_text()


def test_rows_for_another_shape_are_refused_before_anything_is_loaded(tmp_path: Path) -> None:
    _, d7 = _chain(str(tmp_path / "run"))
    torch.manual_seed(1)
    m = TinyRec(rows=60)  # the table grew: its rows no longer line up
    o = adagrad(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(errors.ShapeMismatchError, match=r"model\.delta-5: rows of model/emb\.user\.weight"):
        reckpt.restore_model(d7, m, o, allow_row_resize=True)
    assert state_dicts_equal(m.state_dict(), before)
