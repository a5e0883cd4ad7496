"""An S3 endpoint taken from the environment selects the filesystem (fsspec caches them)."""

from __future__ import annotations

import pytest

from reckpt.storage.core import storage_for


def test_env_endpoint_change_gets_a_new_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9001")
    first = storage_for("s3://bucket/run").fs
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9002")
    second = storage_for("s3://bucket/run").fs
    assert first is not second
    assert (first.endpoint_url, second.endpoint_url) == ("http://127.0.0.1:9001", "http://127.0.0.1:9002")
    explicit = storage_for("s3://bucket/run", {"endpoint_url": "http://127.0.0.1:9003"}).fs
    assert explicit.endpoint_url == "http://127.0.0.1:9003"  # explicit options win over the environment
