from __future__ import annotations

import fnmatch

import pytest

from reckpt.naming import checkpoint_name, is_staging, is_trash, parse_step, staging_name, trash_name


@pytest.mark.parametrize(
    ("name", "step"),
    [
        ("x/model.ckpt-2000", 2000),
        ("x/model.ckpt-2000/", 2000),
        ("model.ckpt-0", 0),
        ("s3://b/run/model.ckpt-7", 7),
        ("x/model.ckpt-abc", None),
        ("x/model.ckpt-", None),
        ("x/model.ckpt-2000.bak", None),
        ("x/model.ckpt-1.5", None),
        ("x/model.ckpt-007", None),
        ("x/ckpt-7", None),
        ("x/custom", None),
        (".reckpt-staging.ab12", None),
    ],
)
def test_parse_step(name: str, step: int | None) -> None:
    assert parse_step(name) == step


def test_checkpoint_name_roundtrip() -> None:
    assert checkpoint_name(100) == "model.ckpt-100"
    assert parse_step(checkpoint_name(123456)) == 123456
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError):
            checkpoint_name(bad)  # type: ignore[arg-type]


def test_staging_and_trash_are_invisible_to_tzrec_glob() -> None:
    """TorchEasyRec globs model_dir/model.ckpt-*/ : staging and trash must never match."""
    for name in (staging_name("abc123"), trash_name("abc123")):
        assert not fnmatch.fnmatch(name, "model.ckpt-*")
        assert parse_step(name) is None
    assert is_staging(staging_name("abc123")) and not is_staging(trash_name("abc123"))
    assert is_trash(trash_name("abc123")) and not is_trash("model.ckpt-1")
