"""Single-process save/restore on every backend, and the commit protocol's visible states."""

from __future__ import annotations

import json

import pytest
import torch

import reckpt
from reckpt.commit.state import checkpoint_state
from reckpt.errors import CheckpointNotFoundError, IncompleteCheckpointError, StepAlreadyExistsError
from reckpt.format.manifest import read_sidecar, write_sidecar
from reckpt.naming import IN_PROGRESS_MARKER, MANIFEST_FILE
from reckpt.storage.core import Storage, storage_for
from tests.helpers import fresh, optim_states_equal, state_dicts_equal, trained


def test_roundtrip_every_backend(root: str) -> None:
    m, o = trained()
    sched = torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)
    sched.step()
    ckpt = f"{root}/model.ckpt-3"
    reckpt.save_model(
        ckpt,
        m,
        o,
        extra_states={"lr_scheduler": sched},
        dataloader_state={"f.parquet:0": 7},
        user_metadata={"note": "hi"},
    )
    assert reckpt.is_committed(ckpt)
    assert reckpt.latest_checkpoint(root) == (ckpt, 3)
    m2, o2 = fresh()
    sched2 = torch.optim.lr_scheduler.StepLR(o2, step_size=9)
    assert not state_dicts_equal(m.state_dict(), m2.state_dict())
    report = reckpt.restore_model(ckpt, m2, o2, extra_states={"lr_scheduler": sched2})
    assert state_dicts_equal(m.state_dict(), m2.state_dict())
    assert optim_states_equal(o, o2)
    assert o2.param_groups[0]["lr"] == o.param_groups[0]["lr"]
    assert sched2.state_dict() == sched.state_dict()
    assert report.verified and not report.legacy
    assert report.part("model").missing == [] and report.part("optimizer").unused == []
    assert reckpt.restore_dataloader_state(ckpt) == {"f.parquet:0": 7}
    st = storage_for(root)
    manifest = json.loads(st.read_text(Storage.join(ckpt, MANIFEST_FILE)))
    assert manifest["step"] == 3 and manifest["world_size"] == 1
    assert manifest["user_metadata"] == {"note": "hi"}
    assert "model/.metadata" in manifest["files"] and "dataloader_state.json" in manifest["files"]
    assert reckpt.verify(ckpt).ok
    # Nothing but the checkpoint is left in model_dir: no staging, no marker.
    assert st.ls(root) == ["model.ckpt-3"]
    assert not st.exists(Storage.join(ckpt, IN_PROGRESS_MARKER))


def test_refuses_existing_step_unless_overwrite(tmp_path) -> None:
    m, o = trained()
    ckpt = str(tmp_path / "model.ckpt-1")
    reckpt.save_model(ckpt, m, o)
    with pytest.raises(StepAlreadyExistsError, match="overwrite=True"):
        reckpt.save_model(ckpt, m, o)
    m2, _ = trained(seed=5)
    reckpt.save_model(ckpt, m2, overwrite=True)
    m3, _ = fresh()
    reckpt.restore_model(ckpt, m3)
    assert state_dicts_equal(m2.state_dict(), m3.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt-1"]


def test_restore_missing_and_incomplete(root: str) -> None:
    m, _ = fresh()
    with pytest.raises(CheckpointNotFoundError, match="not exists"):
        reckpt.restore_model(f"{root}/model.ckpt-5", m)
    st = storage_for(root)
    ckpt = f"{root}/model.ckpt-6"
    st.write_bytes(Storage.join(ckpt, IN_PROGRESS_MARKER), b"{}")
    with pytest.raises(IncompleteCheckpointError, match=r"model\.ckpt-6"):
        reckpt.restore_model(ckpt, m)
    assert checkpoint_state(st, ckpt) == "incomplete"


def test_sidecar_is_atomic_and_checksummed(root: str) -> None:
    m, _ = trained()
    ckpt = f"{root}/model.ckpt-2"
    reckpt.save_model(ckpt, m)
    st = storage_for(root)
    write_sidecar(st, ckpt, "metrics", {"auc": 0.5})
    write_sidecar(st, ckpt, "metrics", {"auc": 0.75})
    assert read_sidecar(st, ckpt, "metrics") == {"auc": 0.75}
    assert read_sidecar(st, ckpt, "timings") is None
    assert reckpt.verify(ckpt).ok  # sidecars are not part of the immutable file set
    path = Storage.join(ckpt, "reckpt.metrics.sidecar.json")
    st.write_bytes(path, st.read_bytes(path).replace(b"0.75", b"0.95"))
    with pytest.raises(reckpt.errors.IntegrityError, match="checksum"):
        read_sidecar(st, ckpt, "metrics")


def test_plan_meta_and_index_layout(tmp_path) -> None:
    """plan JSON, meta flags honoured on restore, TorchEasyRec's index-keyed optimizer layout."""
    m, o = trained()
    plan = {"model.ebc": {"t1": {"sharding_type": "row_wise", "compute_kernel": "fused", "ranks": [0, 1]}}}
    ckpt = str(tmp_path / "model.ckpt-4")
    reckpt.save_model(
        ckpt, m, o, plan=plan, meta={"load_model": True, "load_optim": False}, optimizer_layout="index"
    )
    assert json.loads((tmp_path / "model.ckpt-4" / "plan").read_text()) == plan
    assert "state.0.exp_avg" in reckpt.list_distcp_param(ckpt)
    m2, o2 = fresh()
    report = reckpt.restore_model(ckpt, m2, o2)
    assert state_dicts_equal(m.state_dict(), m2.state_dict())
    assert report.part("optimizer").skipped == "meta.load_optim is false"
    assert o2.state == {}  # not even initialised: nothing was loaded


def test_explicit_storage_options_without_env(s3_server) -> None:
    """Endpoint and credentials given to save/restore directly; no AWS_* variables set."""
    opts = {"endpoint_url": s3_server["endpoint"], "key": "testing", "secret": "testing"}
    ckpt = f"s3://{s3_server['bucket']}/explicit-run/model.ckpt-1"
    m, o = trained()
    reckpt.save_model(ckpt, m, o, storage_options=opts)
    m2, o2 = fresh()
    report = reckpt.restore_model(ckpt, m2, o2, storage_options=opts)
    assert report.verified and state_dicts_equal(m.state_dict(), m2.state_dict())
    assert reckpt.verify(ckpt, storage_options=opts).ok


def test_inspect_reckpt_and_legacy_checkpoints(tmp_path) -> None:
    import torch.distributed.checkpoint as dcp

    m, o = trained()
    ckpt = str(tmp_path / "model.ckpt-1")
    reckpt.save_model(ckpt, m, o)
    contents = reckpt.restore.inspect_checkpoint(ckpt)
    by_name = {e.name: e for e in contents.parts["model"]}
    assert by_name["emb.user.weight"].shape == [50, 4] and by_name["emb.user.weight"].bytes == 800
    assert by_name["emb.user.weight"].dtype == "float32"
    assert "state.emb.user.weight.exp_avg" in {e.name for e in contents.parts["optimizer"]}
    legacy = tmp_path / "legacy" / "model.ckpt-2"
    dcp.save(m.state_dict(), checkpoint_id=str(legacy / "model"), no_dist=True)
    legacy_contents = reckpt.restore.inspect_checkpoint(str(legacy))
    assert [e.name for e in legacy_contents.parts["model"]] == sorted(by_name)
    assert legacy_contents.total_bytes() == sum(e.bytes for e in contents.parts["model"])
    with pytest.raises(CheckpointNotFoundError):
        reckpt.list_distcp_param(str(tmp_path / "nothing"))
