"""One restore path: one DCP part loader, one engine, one storage per restore (real files, no mocks)."""

from __future__ import annotations

import ast
import inspect
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

import reckpt
from reckpt.dcp.load import load_part
from reckpt.dcp.planner import PartialLoadPlanner
from reckpt.delta.row_tracker import RowTracker
from reckpt.delta.save import save_delta
from reckpt.restore.chain import restore_chain
from reckpt.restore.inspection import read_part
from reckpt.sharding import load_unsharded
from reckpt.storage.core import Storage, storage_for
from tests.helpers import TinyRec, state_dicts_equal, train, trained
from tests.helpers.models import adagrad, flat_training_state

SRC = Path(reckpt.__file__).parent
TABLE = "emb.user.weight"
ENGINE_LOG = "reckpt.restore.single"


def _chain_and_full(root: str, opts: dict[str, Any] | None = None) -> tuple[str, str, str]:
    """Full at 3, deltas at 5 and 7, and a full checkpoint of the same state at 7."""
    torch.manual_seed(0)
    m = TinyRec(rows=50)
    o = adagrad(m)
    tracker = RowTracker(m, tables=[TABLE])
    train(m, o, steps=3, seed=1)
    base = reckpt.save_model(Storage.join(root, "model.ckpt-3"), m, o, storage_options=opts)
    tracker.clear()
    train(m, o, steps=2, seed=2)
    d5 = Storage.join(root, "model.delta-5")
    save_delta(d5, m, o, tracker, base, storage_options=opts)
    tracker.clear()
    train(m, o, steps=2, seed=3)
    d7 = Storage.join(root, "model.delta-7")
    save_delta(d7, m, o, tracker, d5, storage_options=opts)
    full = reckpt.save_model(Storage.join(root, "model.ckpt-7"), m, o, storage_options=opts)
    return base, d7, full


def _fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(123)
    m = TinyRec(rows=50)
    return m, adagrad(m)


def _engine_runs(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The checkpoint of every LoadReport the engine logged (one summary per engine run)."""
    runs = []
    for r in caplog.records:
        first = r.getMessage().splitlines()[0]
        if r.name == ENGINE_LOG and first.startswith("restored "):
            runs.append(first.removeprefix("restored ").split(" (verified=")[0])
    return runs


def test_chain_restore_equals_the_full_checkpoint_and_runs_the_engine_per_restored_link(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base, d7, full = _chain_and_full(str(tmp_path / "run"))
    via_full, o_full = _fresh()
    with caplog.at_level(logging.INFO, logger=ENGINE_LOG):
        reckpt.restore_model(full, via_full, o_full)
    assert _engine_runs(caplog) == [full]
    caplog.clear()

    via_chain, o_chain = _fresh()
    with caplog.at_level(logging.INFO, logger=ENGINE_LOG):
        report = reckpt.restore_model(d7, via_chain, o_chain)
    # the engine ran on the base, then on the delta's own files; the link between gave rows only
    assert _engine_runs(caplog) == [base, d7]
    assert state_dicts_equal(flat_training_state(via_chain, o_chain), flat_training_state(via_full, o_full))
    assert report.checkpoint == d7 and report.verified  # verified: the base's engine run
    assert TABLE in report.part("model").loaded and not report.missing_keys
    assert report.part("optimizer").loaded
    assert any("['model.ckpt-3', 'model.delta-5', 'model.delta-7']" in n for n in report.notes)


def test_delta_alone_runs_the_engine_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, d7, _ = _chain_and_full(str(tmp_path / "run"))
    m, o = _fresh()
    with caplog.at_level(logging.INFO, logger=ENGINE_LOG):
        report = reckpt.restore_model(d7, m, o, follow_delta_chain=False)
    assert _engine_runs(caplog) == [d7]
    assert not any("restored the chain" in n for n in report.notes)


def test_the_chain_calls_the_engine_not_the_public_function() -> None:
    assert "restore" not in inspect.signature(restore_chain).parameters
    for module in ("chain", "single", "target"):
        tree = ast.parse((SRC / "restore" / f"{module}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "reckpt.restore.engine" not in imported, module
        assert "reckpt" not in imported, module  # not even through the package root
    chain = ast.parse((SRC / "restore" / "chain.py").read_text())
    assert any(isinstance(n, ast.ImportFrom) and n.module == "reckpt.restore.single" for n in ast.walk(chain))


def _modules_doing(predicate: Any) -> set[str]:
    found = set()
    for f in SRC.rglob("*.py"):
        if any(predicate(n) for n in ast.walk(ast.parse(f.read_text()))):
            found.add(str(f.relative_to(SRC)))
    return found


def test_one_module_loads_dcp_parts() -> None:
    """Restore parts, conversions, the unsharded loader and read_part all go through load_part."""

    def imports_loader(n: ast.AST) -> bool:
        return isinstance(n, ast.ImportFrom) and n.module == "torch.distributed.checkpoint.state_dict_loader"

    def builds_reader(n: ast.AST) -> bool:
        return isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", "")) == "SafeReader"

    assert _modules_doing(imports_loader) == {"dcp/load.py"}
    assert _modules_doing(builds_reader) == {"dcp/load.py"}

    def calls_load_part(n: ast.AST) -> bool:
        return isinstance(n, ast.Call) and getattr(n.func, "id", "") == "load_part"

    users = _modules_doing(calls_load_part)
    want = {
        "restore/part_loader.py",
        "restore/inspection.py",
        "sharding/unsharded.py",
        "sharding/fused_fill.py",
    }
    assert want <= users


def test_every_reader_of_a_part_gets_the_same_values(tmp_path: Path) -> None:
    m, o = trained(extra=True)
    ck = reckpt.save_model(str(tmp_path / "model.ckpt-1"), m, o)
    want = m.state_dict()
    assert state_dicts_equal(read_part(ck, "model"), want)
    plain = TinyRec(extra=True)
    load_unsharded(ck, plain)
    assert state_dicts_equal(plain.state_dict(), want)
    restored = TinyRec(extra=True)
    reckpt.restore_model(ck, restored)
    assert state_dicts_equal(restored.state_dict(), want)
    # the helper itself, on a destination of the saved shapes: tensors are read in place
    dest = {k: torch.empty_like(v) for k, v in want.items()}
    reader = load_part(dest, storage_for(ck), f"{ck}/model", PartialLoadPlanner(source=f"{ck}/model"))
    assert reader.direct_items == len(dest) and reader.dcp_items == 0
    assert state_dicts_equal(dest, want)


def test_s3_configured_only_through_storage_options(
    s3_server: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var, raising=False)
    opts = {"endpoint_url": s3_server["endpoint"], "key": "testing", "secret": "testing"}
    root = f"s3://{s3_server['bucket']}/restore-path"
    _, d7, full = _chain_and_full(root, opts)

    via_full, o_full = _fresh()
    report = reckpt.restore_model(full, via_full, o_full, storage_options=opts)
    assert report.verified
    via_chain, o_chain = _fresh()
    report = reckpt.restore_model(d7, via_chain, o_chain, storage_options=opts)
    assert report.verified
    assert state_dicts_equal(flat_training_state(via_chain, o_chain), flat_training_state(via_full, o_full))

    want = via_full.state_dict()
    assert state_dicts_equal(read_part(full, "model", storage_options=opts), want)
    plain = TinyRec(rows=50)
    load_unsharded(full, plain, storage_options=opts)
    assert state_dicts_equal(plain.state_dict(), want)
    assert "model" in reckpt.restore.inspect_checkpoint(d7, storage_options=opts).parts
    assert reckpt.verify(d7, storage_options=opts).ok
