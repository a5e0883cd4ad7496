"""Which entries of a checkpoint folder reckpt may delete or replace (pure)."""

from __future__ import annotations

import pytest

from reckpt.ownership import foreign_names, is_internal, is_owned, manifest_members, temp_base


@pytest.mark.parametrize(
    "name",
    [
        "model",
        "optimizer",
        "dense_ema",
        "plan",
        "meta",
        "dataloader_state.json",
        "dynamicemb",
        "delta_rows",
        "reckpt.json",
        "reckpt.metrics.sidecar.json",
        "reckpt.metrics.sidecar.json.tmp-123-0a1b2c3d",
        ".reckpt-in-progress",
        ".reckpt-owner.json",
        ".reckpt-replace.json",
        ".reckpt-deleting",
    ],
)
def test_reckpts_own_names(name: str) -> None:
    assert is_owned(name)


@pytest.mark.parametrize(
    "name",
    [
        "mapping.txt",
        "notes.txt",
        "model.ckpt-7-notes",
        "model.bak",
        "models",
        "lr_scheduler",  # an extra state only when the manifest records it
        "reckpt.txt",
        "notes.txt.tmp-123-0a1b2c3d",  # looks like a temporary, of a foreign file
        "README",
    ],
)
def test_foreign_names(name: str) -> None:
    assert not is_owned(name)


def test_recorded_members_are_owned() -> None:
    assert is_owned("lr_scheduler", {"lr_scheduler"})
    assert foreign_names(["model", "lr_scheduler", "z", "a"], {"lr_scheduler"}) == ["a", "z"]


def test_manifest_members_and_temporaries() -> None:
    assert manifest_members(["model/__0_0.distcp", "plan", "train_state/.metadata"]) == {
        "model",
        "plan",
        "train_state",
    }
    assert temp_base("plan.tmp-1-ff") == "plan" and temp_base("plan.tmp-x-ff") is None
    assert is_internal(".reckpt-anything") and not is_internal("model")
