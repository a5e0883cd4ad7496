"""The storage layer's rules that need no storage: retries, transient errors, paths, schemes."""

from __future__ import annotations

import errno

import pytest

from reckpt.errors import ConfigError
from reckpt.storage.core import RETRY, RetryPolicy, Storage, is_transient, storage_for


def test_retry_policy_is_small_and_bounded() -> None:
    assert RETRY.delays() == [0.05, 0.1, 0.2]
    assert RetryPolicy(attempts=10, max_delay_s=0.3).delays()[-1] == 0.3


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (OSError(errno.EIO, "x"), True),
        (OSError(errno.EAGAIN, "x"), True),
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (OSError(errno.ENOSPC, "x"), False),
        (OSError(errno.EROFS, "x"), False),
        (FileNotFoundError(errno.ENOENT, "x"), False),
        (ValueError("x"), False),
    ],
)
def test_is_transient(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


def test_unknown_scheme_is_config_error() -> None:
    with pytest.raises(ConfigError, match="nosuchproto://x"):
        storage_for("nosuchproto://x")


def test_parent_and_join() -> None:
    assert Storage.parent("s3://b/run/model.ckpt-1") == "s3://b/run"
    assert Storage.parent("/a/b/") == "/a"
    assert Storage.join("s3://b/run/", "model.ckpt-1", "model") == "s3://b/run/model.ckpt-1/model"
