"""The phase of each storage operation of the commit protocol (pure)."""

from __future__ import annotations

import pytest

from reckpt.testing.kill_points import PHASES, op_phase

S = "run/.reckpt-staging.ab12"


@pytest.mark.parametrize(
    ("kind", "path", "phase"),
    [
        ("write", f"{S}/model/__0_0.distcp", "data"),
        ("write", f"{S}/model/.metadata.tmp", "data"),
        ("rename", f"{S}/model/.metadata.tmp -> {S}/model/.metadata", "data"),
        ("write", f"{S}/plan", "data"),
        ("fsync", f"{S}/model", "fsync"),
        ("write", f"{S}/reckpt.json", "manifest"),
        ("write", "run/model.ckpt-5/reckpt.json", "manifest"),
        ("rename", f"{S} -> run/model.ckpt-5", "commit"),
        ("write", f"{S}/.reckpt-owner.json", "commit"),
        ("delete", "run/model.ckpt-5/.reckpt-in-progress", "commit"),
        ("rename", "run/model.ckpt-1 -> run/.reckpt-trash.cd", "prune"),
        ("delete", "run/.reckpt-trash.cd", "prune"),
        ("write", "run/model.ckpt-1/.reckpt-deleting", "prune"),
        ("delete", "run/model.ckpt-1/reckpt.json", "prune"),
        ("delete", "run/model.ckpt-1/model/__0_0.distcp", "prune"),
        ("write", "run/model.ckpt-5/reckpt.metrics.sidecar.json.tmp-12-ab", "sidecar"),
        ("rename", "run/model.ckpt-5/x.tmp -> run/model.ckpt-5/reckpt.metrics.sidecar.json", "sidecar"),
        ("write", "run/.reckpt-lock.json", "other"),
        ("mkdir", "run", "other"),
    ],
)
def test_op_phase(kind: str, path: str, phase: str) -> None:
    assert op_phase(kind, path) == phase and phase in PHASES
