"""Shared fixtures: environment and process-group hygiene, storage roots, moto's S3 server."""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers.processes import free_port

# moto's werkzeug server logs every request; keep test output readable.
logging.getLogger("werkzeug").setLevel(logging.WARNING)
logging.getLogger("c10d-NullHandler-dcp_logger").setLevel(logging.WARNING)

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(autouse=True)
def _restore_env() -> Iterator[None]:
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    before = {t.ident for t in threading.enumerate()}
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        pytest.fail("test left a process group initialised")
    leaked = [t for t in threading.enumerate() if t.ident not in before and t.name.startswith("reckpt")]
    if leaked:
        pytest.fail(f"test leaked threads: {[t.name for t in leaked]}")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, Any]]:
    """moto's S3 server on 127.0.0.1 (never 0.0.0.0), with one bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}
    bucket = "reckpt-test"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=bucket)
    try:
        yield {"endpoint": endpoint, "bucket": bucket, "env": env}
    finally:
        server.stop()


@pytest.fixture
def s3_root(s3_server: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh ``s3://`` prefix; credentials and endpoint come from the standard env vars."""
    for k, v in s3_server["env"].items():
        monkeypatch.setenv(k, v)
    return f"s3://{s3_server['bucket']}/{uuid.uuid4().hex[:12]}"


def _root_on(backend: str, request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if backend == "local":
        return str(tmp_path / "run")
    if backend == "file":
        return f"file://{tmp_path}/run"
    if backend == "memory":
        return f"memory://reckpt-{uuid.uuid4().hex[:12]}/run"
    return str(request.getfixturevalue("s3_root")) + "/run"


@pytest.fixture(params=["local", "file", "memory", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """A fresh, empty root on each backend: plain path, file://, memory://, s3://."""
    return _root_on(request.param, request, tmp_path)


@pytest.fixture(params=["local", "file", "s3"])
def shared_root(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """A root on every backend that a child process sees as its parent does (not memory://)."""
    return _root_on(request.param, request, tmp_path)
