"""Dynamic tables on 2 and 3 gloo processes: training equals one process; dumps reshard by key."""

from __future__ import annotations

from pathlib import Path

import torch

from reckpt.dynamic import load_dynamic
from reckpt.dynamic.table import TableState
from tests.distributed import dynamic_scenarios as sc
from tests.distributed.launcher import run_world
from tests.helpers import assert_state_dicts_equal
from tests.helpers.tensors import table_fields


def loaded(ckpt: str) -> sc.Pair:
    """A one-process model holding the whole dump (every shard, whatever world size wrote it)."""
    model = sc.Pair()
    load_dynamic(ckpt, model)
    return model


def exports(model: sc.Pair) -> dict[str, TableState]:
    return {"user": model.user.table.export(), "item": model.item.table.export()}


def test_two_processes_train_like_one_then_reshard_to_one_and_three(tmp_path: Path) -> None:
    ck2, ck3 = str(tmp_path / "w2" / "model.ckpt-5"), str(tmp_path / "w3" / "model.ckpt-5")
    run_world(2, "tests.distributed.dynamic_scenarios.train_and_save", ck2)
    reference = sc.Pair()
    sc.train(reference, 0, 1)
    ref, got = exports(reference), exports(loaded(ck2))
    assert len(ref["user"].keys) > 10 and len(ref["user"].counter_keys) > 0
    for name in ref:
        for f in ("keys", "scores", "counter_keys", "counter_freqs"):
            assert torch.equal(getattr(ref[name], f), getattr(got[name], f)), (name, f)
        # The summed gradient of two ranks adds the same terms in another order: float tolerance.
        assert torch.allclose(ref[name].values, got[name].values, rtol=1e-5, atol=1e-6), name
        assert torch.allclose(ref[name].opt_values, got[name].opt_values, rtol=1e-4, atol=1e-7), name

    # Saved with 2 processes, restored with 3 and saved again: bitwise the same tables.
    run_world(3, "tests.distributed.dynamic_scenarios.restore_and_save", ck2, ck3)
    again = exports(loaded(ck3))
    for name in got:
        assert_state_dicts_equal(table_fields(got[name]), table_fields(again[name]))
    assert sorted(p.name for p in (Path(ck3) / "dynamicemb" / "model.user").iterdir())[:3] == [
        "user_counter_frequencies.rank_0.world_size_3",
        "user_counter_frequencies.rank_1.world_size_3",
        "user_counter_frequencies.rank_2.world_size_3",
    ]

    # A truncated shard of the 2-process dump: all 3 ranks raise before any table changes.
    shard = Path(ck2) / "dynamicemb" / "model.user" / "user_emb_values.rank_1.world_size_2"
    shard.write_bytes(shard.read_bytes()[:-4])
    run_world(3, "tests.distributed.dynamic_scenarios.corrupt_restore", ck2)
