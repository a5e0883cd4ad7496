"""Save/restore on real gloo process groups: same size, 2->1, 2->3, 1->2, partial and remapped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import reckpt
from tests.distributed import scenarios
from tests.distributed.launcher import run_world


@pytest.fixture(scope="module")
def saved_world2(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-process checkpoint (written once for the module), after a 1->2 load check."""
    root = tmp_path_factory.mktemp("dist")
    single = scenarios.Holder(seed=100, sharded=False)
    reckpt.save_model(str(root / "single" / "model.ckpt-100"), single)
    run_world(
        2,
        "tests.distributed.scenarios.save_and_restore_world",
        str(root / "run"),
        str(root / "single" / "model.ckpt-100"),
    )
    return str(root / "run" / "model.ckpt-1")


def test_world2_roundtrip_partial_remap_and_1_to_2(saved_world2: str) -> None:
    manifest = reckpt.restore.inspect_checkpoint(saved_world2)
    assert {e.name for e in manifest.parts["model"]} == {"lin.weight", "lin.bias", "tables.st", "tables.dt"}
    assert reckpt.verify(saved_world2).ok


def test_2_to_1_into_plain_process(saved_world2: str) -> None:
    plain = scenarios.Holder(seed=7, sharded=False)
    opt = torch.optim.Adam(plain.parameters(), lr=0.9)
    report = reckpt.restore_model(saved_world2, plain, opt)
    st, dt = scenarios.global_tables(1)
    assert torch.equal(plain.st, st) and torch.equal(plain.dt, dt)
    assert report.verified and opt.param_groups[0]["lr"] == 0.1
    assert int(opt.state[plain.lin.weight]["step"]) == 1


def test_2_to_3(saved_world2: str) -> None:
    run_world(3, "tests.distributed.scenarios.restore_world", saved_world2)


def test_manifest_records_world_size(saved_world2: str) -> None:
    import json

    doc = json.loads((Path(saved_world2) / "reckpt.json").read_text())
    assert doc["world_size"] == 2
    assert any(p.startswith("model/__1_") for p in doc["files"]), "rank 1's shard file is checksummed"


def test_torchrec_resharding_matrix(tmp_path: Path) -> None:
    """Worlds 1, 2, 3 each save plans A and B; each loads all six checkpoints under both plans.

    Weights are bit-exact in every cell; the row-wise Adagrad state is exact (or re-initialised
    and reported) as ``docs/resharding.md``'s conversion table says.
    """
    target = "tests.distributed.reshard_scenarios.save_and_load"
    for world, save, load in (
        (1, True, False),
        (2, True, False),
        (3, True, True),
        (1, False, True),
        (2, False, True),
    ):
        run_world(world, target, str(tmp_path), save, load, timeout_s=600)
