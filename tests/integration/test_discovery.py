"""latest/best/list on real model_dirs (local, file://, memory://, s3://): compat §2/§3 and fixes."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

import reckpt
from reckpt.errors import CheckpointNotFoundError, ConfigError, IncompleteCheckpointError
from reckpt.format.eval_results import (
    append_eval_result,
    format_eval_line,
    read_eval_results,
    write_checkpoint_metrics,
)
from reckpt.naming import IN_PROGRESS_MARKER, staging_name
from reckpt.storage.core import Storage, storage_for
from tests.helpers import trained

TZREC_LINES = [
    (0, {"auc": 0.633, "grouped_auc": 0.565}),
    (10, {"auc": 0.632, "grouped_auc": 0.570}),
    (20, {"auc": 0.631, "grouped_auc": 0.567}),
]


def _save(root: str, *steps: int) -> None:
    m, _ = trained()
    for s in steps:
        reckpt.save_model(f"{root}/model.ckpt-{s}", m)


def test_latest_skips_everything_that_is_not_a_committed_checkpoint(root: str) -> None:
    _save(root, 9, 10)
    st = storage_for(root)
    for junk in ("model.ckpt-100.bak", "model.ckpt-abc", "model.ckpt-1.5", staging_name("ab12")):
        st.write_bytes(Storage.join(root, junk, "model", ".metadata"), b"x")
    st.write_bytes(Storage.join(root, "model.ckpt-50", IN_PROGRESS_MARKER), b"{}")  # a crashed save
    st.write_bytes(Storage.join(root, "model.ckpt-60"), b"a file, not a directory")
    assert reckpt.latest_checkpoint(root) == (f"{root}/model.ckpt-10", 10)
    assert reckpt.latest_checkpoint(root + "/") == (f"{root}/model.ckpt-10", 10)
    assert reckpt.latest_checkpoint(f"{root}/model.ckpt-9/") == (f"{root}/model.ckpt-9", 9)
    with pytest.raises(IncompleteCheckpointError):
        reckpt.latest_checkpoint(f"{root}/model.ckpt-50")
    with pytest.raises(CheckpointNotFoundError):
        reckpt.latest_checkpoint(f"{root}/model.ckpt-70")
    listed = {c.step: c.state for c in reckpt.list_checkpoints(root)}
    assert listed == {9: "committed", 10: "committed", 50: "incomplete"}


def test_latest_empty_and_legacy_layout(tmp_path) -> None:
    assert reckpt.latest_checkpoint(str(tmp_path / "nothing")) == (None, -1)
    (tmp_path / "legacy" / "model").mkdir(parents=True)
    assert reckpt.latest_checkpoint(str(tmp_path / "legacy")) == (str(tmp_path / "legacy"), 0)


def test_eval_line_format_and_garbled_lines(tmp_path, caplog) -> None:
    assert format_eval_line(2000, {"grouped_auc": 0.6621, "auc": 0.7312}) == (
        '{"global_step": 2000, "auc": 0.7312, "grouped_auc": 0.6621}\n'
    )
    st = storage_for(str(tmp_path))
    path = str(tmp_path / "r.txt")
    append_eval_result(st, path, 1, {"auc": 0.5})
    with open(path, "a") as f:
        f.write("\n{not json\n")
    append_eval_result(st, path, 2, {"auc": 0.6})
    with caplog.at_level(logging.WARNING):
        res = read_eval_results(st, path)
    assert res.by_step == {1: {"auc": 0.5}, 2: {"auc": 0.6}}
    assert len(res.problems) == 1 and "r.txt:3:" in res.problems[0] and "r.txt:3:" in caplog.text


def _write_results(root: str, lines) -> None:
    st = storage_for(root)
    for step, metrics in lines:
        append_eval_result(st, f"{root}/train_eval_result_v2.txt", step, metrics)


def test_best_tzrec_vector_every_backend(root: str) -> None:
    _save(root, 0, 10, 20)
    _write_results(root, TZREC_LINES)
    assert reckpt.best_checkpoint(root, metric="grouped_auc") == (f"{root}/model.ckpt-10", 10)
    assert reckpt.best_checkpoint(root, metric="grouped_auc", larger_is_better=False) == (
        f"{root}/model.ckpt-0",
        0,
    )
    cfg = SimpleNamespace(
        best_exporter_metric="grouped_auc", metric_larger_is_better=False, exporter_type="best"
    )
    assert reckpt.best_checkpoint(root, cfg) == (f"{root}/model.ckpt-0", 0)
    # Several metrics, none named: auc is the default when present.
    assert reckpt.best_checkpoint(root) == (f"{root}/model.ckpt-0", 0)


def test_best_metric_name_rules(tmp_path) -> None:
    root = str(tmp_path)
    _save(root, 1, 2)
    _write_results(root, [(1, {"logloss": 0.5}), (2, {"logloss": 0.4})])
    assert reckpt.best_checkpoint(root, larger_is_better=False)[1] == 2  # the single metric
    _write_results(root, [(1, {"logloss": 0.3, "gauc": 0.1})])
    with pytest.raises(ConfigError, match="gauc, logloss"):
        reckpt.best_checkpoint(root)
    with pytest.raises(ValueError, match="'ndcg' is not recorded"):
        reckpt.best_checkpoint(root, metric="ndcg")


class _Proto:
    """Protobuf-like ExportConfig: best_exporter_metric's default 'auc' is not 'set'."""

    best_exporter_metric = "auc"
    metric_larger_is_better = True
    exporter_type = "best"

    def HasField(self, name: str) -> bool:
        return False


def test_best_with_proto_default_metric_unset(tmp_path) -> None:
    root = str(tmp_path)
    _save(root, 1, 2)
    _write_results(root, [(1, {"logloss": 0.5}), (2, {"logloss": 0.6})])
    # The unset proto default "auc" must not apply; the single metric is used (TorchEasyRec crashed).
    assert reckpt.best_checkpoint(root, _Proto()) == (f"{root}/model.ckpt-2", 2)


def test_best_pruned_falls_back_with_warning(tmp_path, caplog) -> None:
    root = str(tmp_path)
    _save(root, 10, 30)
    _write_results(root, [(10, {"auc": 0.7}), (20, {"auc": 0.9}), (30, {"auc": 0.8})])
    with caplog.at_level(logging.WARNING):
        assert reckpt.best_checkpoint(root) == (f"{root}/model.ckpt-30", 30)
    assert "model.ckpt-20 is not a committed checkpoint" in caplog.text


def test_best_without_results_is_latest(root: str) -> None:
    _save(root, 3, 7)
    assert reckpt.best_checkpoint(root) == (f"{root}/model.ckpt-7", 7)


def test_sidecar_wins_and_survives_a_lost_results_file(tmp_path, caplog) -> None:
    root = str(tmp_path)
    _save(root, 1, 2)
    st = storage_for(root)
    _write_results(root, [(1, {"auc": 0.9}), (2, {"auc": 0.5})])
    write_checkpoint_metrics(st, f"{root}/model.ckpt-1", "eval", {"auc": 0.1})
    write_checkpoint_metrics(st, f"{root}/model.ckpt-2", "eval", {"auc": 0.5})
    with caplog.at_level(logging.WARNING):
        assert reckpt.best_checkpoint(root)[1] == 2
    assert "step 1" in caplog.text and "using the sidecar" in caplog.text
    (tmp_path / "train_eval_result_v2.txt").write_text("garbage\n")
    assert reckpt.best_checkpoint(root)[1] == 2
    infos = reckpt.list_checkpoints(root)
    assert [c.metrics for c in infos] == [{"auc": 0.1}, {"auc": 0.5}]
    assert all(c.size and c.size > 0 and c.created_at for c in infos)
