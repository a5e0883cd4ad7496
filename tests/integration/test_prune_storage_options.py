"""Pruning an ``s3://`` model_dir reached through ``storage_options`` alone (no AWS_* variables).

The manager creates its storage once, from ``model_dir`` and ``storage_options``, and every
background pass (pruning included) uses that storage: a pass that opened the store from the
environment instead would find no endpoint and no credentials, log a warning and delete nothing.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pytest
from torch import nn

import reckpt
from reckpt.storage.core import storage_for

AWS_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
)


def test_pruning_uses_the_managers_storage_options(
    s3_server: dict[str, Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name in AWS_VARS:
        monkeypatch.delenv(name, raising=False)
    # No shared config file either: the endpoint and credentials exist only in storage_options.
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("RANK", "0")
    opts = {"endpoint_url": s3_server["endpoint"], "key": "testing", "secret": "testing"}
    model_dir = f"s3://{s3_server['bucket']}/{uuid.uuid4().hex[:12]}/run"
    model = nn.Linear(2, 1)

    with caplog.at_level(logging.WARNING, logger="reckpt"):
        with reckpt.CheckpointManager(model_dir, keep_checkpoint_max=2, storage_options=opts) as mgr:
            for step in (10, 20, 30, 40):
                mgr.save(step, model)
        infos = reckpt.list_checkpoints(model_dir, storage_options=opts)

    assert [c.step for c in infos if c.committed] == [30, 40]
    assert [c.step for c in infos] == [30, 40]  # the pruned ones are gone, not half-deleted
    names = storage_for(model_dir, opts).ls(model_dir)
    assert not [n for n in names if n.startswith(("model.ckpt-10", "model.ckpt-20"))]
    pruning = [r.getMessage() for r in caplog.records if "pruning" in r.getMessage()]
    assert pruning == []
