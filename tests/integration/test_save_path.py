"""One save path: every checkpoint of a model is assembled by one function and committed by one predicate.

``save_model``, ``CheckpointManager.save`` (synchronous and asynchronous) and ``save_delta``
all assemble their checkpoint with :func:`reckpt.save.contents.assemble` (by way of
:func:`reckpt.save.engine.save_checkpoint`), so the same model gives the same layout, plan,
dataloader state and metadata whichever of them saved it; and whether a checkpoint is
committed is decided by :func:`reckpt.commit.state.checkpoint_state` alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

import reckpt
import reckpt.save.engine
from reckpt.dynamic import DynamicEmbedding
from reckpt.format.eval_results import read_checkpoint_metrics, read_eval_results
from reckpt.format.manifest import Manifest, read_manifest
from reckpt.lifecycle.resume import TrainState
from reckpt.naming import DELETING_MARKER, META_FILE
from reckpt.policy import IncrementalPolicy
from reckpt.save.contents import SaveContents
from reckpt.storage.core import storage_for

TABLE = "emb.user.weight"
PLAN = {"emb": {"user": {"sharding_type": "row_wise", "compute_kernel": "fused", "ranks": [0]}}}
DL_STATE = {"part.parquet:0": 41, "__epochs_completed__": 1}
USER_META = {"run": "same-model"}


class Mixed(nn.Module):
    """A tracked embedding table, a dynamic table and a dense tower, carrying a sharding plan."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.ModuleDict({"user": nn.Embedding(50, 4)})
        self.item = DynamicEmbedding(4, name="item", lr=0.1)
        self.tower = nn.Linear(8, 1)
        self._plan = SimpleNamespace(plan=PLAN)  # what model_plan() reads off a DMP

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(len(items) + 1)
        out: torch.Tensor = self.tower(torch.cat([self.emb["user"](users), self.item(items, offsets)], 1))
        return out


def _train(m: Mixed, o: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    users, items = torch.randint(0, 50, (8,), generator=g), torch.randint(0, 30, (8,), generator=g)
    o.zero_grad()
    m(users, items).pow(2).mean().backward()
    o.step()


def _model() -> tuple[Mixed, torch.optim.Optimizer]:
    torch.manual_seed(0)
    m = Mixed()
    o = torch.optim.Adagrad(m.parameters(), lr=0.1)  # untouched rows stay put: deltas are exact
    _train(m, o, seed=1)
    return m, o


def _manifest(path: str) -> Manifest:
    manifest = read_manifest(storage_for(path), path)
    assert manifest is not None
    return manifest


def _layout(path: str) -> dict[str, Any]:
    """What a save decides about a checkpoint's content, leaving out the values themselves."""
    manifest = _manifest(path)
    root = Path(path)
    return {
        "parts": sorted(manifest.entries),
        "model keys": sorted(e.name for e in manifest.entries["model"]),
        "files": sorted(manifest.files),
        "plan": json.loads((root / "plan").read_text()),
        "dataloader_state": json.loads((root / "dataloader_state.json").read_text()),
        "meta": (root / META_FILE).exists(),
        "user_metadata": manifest.user_metadata,
    }


def _save_all_four(tmp_path: Path) -> dict[str, str]:
    """The same model at step 3 by save_model, the manager (sync, async), and a delta at step 5."""
    m, o = _model()
    out = {
        "save_model": reckpt.save_model(
            str(tmp_path / "a" / "model.ckpt-3"),
            m,
            o,
            extra_states={"train_state": TrainState(3, 0)},  # what the manager adds
            dataloader_state=DL_STATE,
            user_metadata=USER_META,
        )
    }
    with reckpt.CheckpointManager(str(tmp_path / "b")) as mgr:
        out["manager"] = mgr.save(3, m, o, DL_STATE, user_metadata=USER_META)
    with reckpt.CheckpointManager(str(tmp_path / "c"), async_save=True) as mgr:
        out["manager async"] = mgr.save(3, m, o, DL_STATE, user_metadata=USER_META)
    policy = IncrementalPolicy(max_delta_fraction=1.0, tables=(TABLE,))
    with reckpt.CheckpointManager(str(tmp_path / "d"), incremental=policy) as mgr:
        mgr.save(3, m, o, DL_STATE, user_metadata=USER_META)
        _train(m, o, seed=2)
        out["save_delta"] = mgr.save(5, m, o, DL_STATE, user_metadata=USER_META)
    assert Path(out["save_delta"]).name == "model.delta-5"
    return out


def test_the_three_save_entry_points_write_the_same_checkpoint_layout(tmp_path: Path) -> None:
    paths = _save_all_four(tmp_path)
    full = _layout(paths["save_model"])
    assert full["parts"] == ["model", "optimizer", "train_state"]
    assert full["plan"] == PLAN and full["dataloader_state"] == DL_STATE and not full["meta"]
    assert full["user_metadata"] == USER_META
    assert any(f.startswith("dynamicemb/") for f in full["files"])
    assert _layout(paths["manager"]) == full
    assert _layout(paths["manager async"]) == full

    delta = _layout(paths["save_delta"])
    # The same assembly, then the tracked table's touched rows moved into delta_rows/.
    assert delta["model keys"] == [k for k in full["model keys"] if k != TABLE]
    assert set(full["files"]) <= set(delta["files"])
    added = sorted(set(delta["files"]) - set(full["files"]))
    removals = [f for f in added if f.startswith("dynamicemb/") and "_removed_keys." in f]  # a touched dump's
    assert sorted(set(added) - set(removals)) == ["delta_rows/rank_0.bin", "delta_rows/rank_0.json"]
    assert {k: v for k, v in delta.items() if k not in ("model keys", "files")} == {
        k: v for k, v in full.items() if k not in ("model keys", "files")
    }
    assert _manifest(paths["save_delta"]).delta is not None
    assert all(_manifest(paths[k]).delta is None for k in ("save_model", "manager", "manager async"))


def test_every_save_is_assembled_by_the_one_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spy (it calls the real function) records what each save assembled."""
    assembled: list[SaveContents] = []
    real = reckpt.save.engine.assemble

    def spy(*args: Any, **kwargs: Any) -> SaveContents:
        contents = real(*args, **kwargs)
        assembled.append(contents)
        return contents

    monkeypatch.setattr(reckpt.save.engine, "assemble", spy)
    _save_all_four(tmp_path)
    # save_model, manager, manager async, the incremental manager's full save and its delta
    assert len(assembled) == 5
    assert all(c.plan.plan == PLAN and c.dataloader_state == DL_STATE for c in assembled)
    assert all(c.user_metadata == USER_META and c.meta is None for c in assembled)
    assert all([name for name, _ in c.parts] == ["model", "optimizer", "train_state"] for c in assembled)
    full, delta = assembled[:4], assembled[4]
    assert all(c.delta is None and len(c.file_writers) == 1 for c in full)  # the dynamic tables
    assert delta.delta is not None and len(delta.file_writers) == 2  # the rows, the dynamic tables
    assert TABLE not in dict(delta.parts)["model"]


def test_record_eval_does_not_treat_a_checkpoint_being_deleted_as_committed(tmp_path: Path) -> None:
    """The deletion marker makes a checkpoint incomplete, manifest or not: no sidecar goes into it."""
    m, o = _model()
    with reckpt.CheckpointManager(str(tmp_path)) as mgr:
        kept = mgr.save(3, m, o)
        doomed = mgr.save(5, m, o)
        (Path(doomed) / DELETING_MARKER).write_bytes(b"")  # a deletion under way (object stores)
        assert not reckpt.is_committed(doomed)
        mgr.record_eval(3, {"auc": 0.7})
        mgr.record_eval(5, {"auc": 0.8})
    storage = storage_for(str(tmp_path))
    assert read_checkpoint_metrics(storage, kept) == {"auc": 0.7}
    assert read_checkpoint_metrics(storage, doomed) == {}  # nothing written into it
    results = read_eval_results(storage, str(tmp_path / "train_eval_result_v2.txt"))
    assert results.by_step == {3: {"auc": 0.7}, 5: {"auc": 0.8}}  # the results file has both
