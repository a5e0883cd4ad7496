"""Integrity (checksums catch flips and truncation) and safety (no code runs from a checkpoint)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import reckpt
from reckpt.errors import IntegrityError, UnsafeCheckpointError
from reckpt.storage.core import Storage, storage_for
from tests.helpers import flip_byte, fresh, state_dicts_equal, trained


def _data_file(ckpt: str) -> str:
    return next(f for f in sorted(os.listdir(os.path.join(ckpt, "model"))) if f.endswith(".distcp"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corruption_is_caught_and_named(tmp_path: Path, damage: str) -> None:
    m, o = trained()
    ckpt = str(tmp_path / "model.ckpt-1")
    reckpt.save_model(ckpt, m, o)
    target = os.path.join(ckpt, "model", _data_file(ckpt))
    size = os.path.getsize(target)
    if damage == "flip":
        flip_byte(target, size // 2)
    elif damage == "truncate":
        os.truncate(target, size - 10)
    else:
        os.remove(target)
    report = reckpt.verify(ckpt)
    assert not report.ok and len(report.problems) == 1 and _data_file_name(target) in report.problems[0]
    # verify="first": every file is checked before anything changes
    m2, o2 = fresh()
    before = {k: v.clone() for k, v in m2.state_dict().items()}
    with pytest.raises(IntegrityError, match=_data_file_name(target)):
        reckpt.restore_model(ckpt, m2, o2, verify="first")
    assert state_dicts_equal(before, m2.state_dict())
    # the default checks data files while reading them: the error names the file all the same;
    # a missing or truncated file is still caught before anything changes (sizes come first)
    with pytest.raises(IntegrityError, match=_data_file_name(target)) as caught:
        reckpt.restore_model(ckpt, m2, o2)
    if damage == "flip":
        assert "may hold part of this checkpoint" in str(caught.value)
    else:
        assert state_dicts_equal(before, m2.state_dict())


def test_a_verified_restore_reads_data_files_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default verification hashes data files while loading them: no separate pass over them."""
    from reckpt.format import integrity, verification

    m, o = trained()
    ckpt = str(tmp_path / "model.ckpt-1")
    reckpt.save_model(ckpt, m, o)
    hashed_apart: list[str] = []
    real = integrity.hash_stream

    def counting(f):  # type: ignore[no-untyped-def]
        hashed_apart.append(str(getattr(f, "name", f)))
        return real(f)

    monkeypatch.setattr(verification, "hash_stream", counting)
    m2, o2 = fresh()
    report = reckpt.restore_model(ckpt, m2, o2)
    assert report.verified and state_dicts_equal(m.state_dict(), m2.state_dict())
    assert hashed_apart and not [f for f in hashed_apart if f.endswith(".distcp")]
    hashed_apart.clear()
    reckpt.restore_model(ckpt, m2, o2, verify="first")  # the old way hashes them apart
    assert len([f for f in hashed_apart if f.endswith(".distcp")]) == 2


def _data_file_name(path: str) -> str:
    return "model/" + os.path.basename(path)


def test_flipped_metadata_and_json_files_are_caught(root: str) -> None:
    m, o = trained()
    ckpt = f"{root}/model.ckpt-2"
    reckpt.save_model(ckpt, m, o, dataloader_state={"a:0": 1}, meta={"load_model": True})
    st = storage_for(root)
    for rel in ("optimizer/.metadata", "dataloader_state.json", "meta"):
        path = Storage.join(ckpt, rel)
        original = st.read_bytes(path)
        st.write_bytes(path, original[:-1] + bytes([original[-1] ^ 0x20]))
        report = reckpt.verify(ckpt)
        assert [p for p in report.problems if rel in p], (rel, report.problems)
        st.write_bytes(path, original)
    assert reckpt.verify(ckpt).ok


def test_verify_false_skips_checks(tmp_path: Path) -> None:
    m, _ = trained()
    ckpt = str(tmp_path / "model.ckpt-1")
    reckpt.save_model(ckpt, m, user_metadata={"a": 1})
    (tmp_path / "model.ckpt-1" / "unexpected.txt").write_text("x")
    assert reckpt.verify(ckpt).unexpected == ["unexpected.txt"]
    manifest = tmp_path / "model.ckpt-1" / "reckpt.json"
    manifest.write_text(manifest.read_text().replace('"a": 1', '"a": 2'))  # harmless edit
    report = reckpt.restore_model(ckpt, fresh()[0], verify=False)
    assert not report.verified


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.marker, "w"))


def test_metadata_payload_never_runs(tmp_path: Path) -> None:
    m, _ = trained()
    ckpt = tmp_path / "model.ckpt-3"
    dcp.save(m.state_dict(), checkpoint_id=str(ckpt / "model"), no_dist=True)  # legacy: no manifest
    marker = tmp_path / "pwned"
    with open(ckpt / "model" / ".metadata", "wb") as f:
        pickle.dump(_Payload(str(marker)), f)
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: refusing to load \S*open"):
        reckpt.restore_model(str(ckpt), fresh()[0])
    with pytest.raises(UnsafeCheckpointError):
        reckpt.list_distcp_param(str(ckpt))
    assert not marker.exists()


def test_payload_in_non_tensor_item_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "model.ckpt-4"
    m, _ = trained()
    dcp.save(
        {**m.state_dict(), "evil": _Payload(str(marker))}, checkpoint_id=str(ckpt / "model"), no_dist=True
    )
    assert not marker.exists()

    class WithEvil(type(m)):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.evil_value: object = None

        def state_dict(self, *a, **k):  # type: ignore[no-untyped-def]
            sd = super().state_dict(*a, **k)
            sd["evil"] = None
            return sd

        def load_state_dict(self, sd, *a, **k):  # type: ignore[no-untyped-def]
            self.evil_value = sd.pop("evil")
            return super().load_state_dict(sd, *a, **k)

    with pytest.raises(UnsafeCheckpointError, match="not plain data"):
        reckpt.restore_model(str(ckpt), WithEvil())
    assert not marker.exists()


def test_storage_entry_pointing_outside_is_refused(tmp_path: Path) -> None:
    m, _ = trained()
    ckpt = tmp_path / "model.ckpt-5"
    dcp.save(m.state_dict(), checkpoint_id=str(ckpt / "model"), no_dist=True)
    md_path = ckpt / "model" / ".metadata"
    with open(md_path, "rb") as f:
        md = pickle.load(f)  # our own, known-good file
    for info in md.storage_data.values():
        info.relative_path = "../../etc/passwd"
    with open(md_path, "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(UnsafeCheckpointError, match="outside the checkpoint directory"):
        reckpt.restore_model(str(ckpt), fresh()[0])


def test_real_metadata_passes_the_allow_list(tmp_path: Path) -> None:
    """Tensors of several dtypes, a non-tensor item, nested optimizer state."""
    sd = {
        "f": torch.randn(3),
        "h": torch.ones(2, dtype=torch.float16),
        "i": torch.arange(4),
        "b": torch.tensor([True]),
        "cfg": {"lr": 0.1, "betas": (0.9, 0.99), "name": "adam"},
    }
    dcp.save(sd, checkpoint_id=str(tmp_path / "x"), no_dist=True)
    names = reckpt.list_distcp_param(str(tmp_path / "x"))
    assert names == ["b", "f", "h", "i"]


@pytest.mark.parametrize("offset", [0, 2])
def test_a_damaged_archive_header_is_named_not_a_zip_error(tmp_path: Path, offset: int) -> None:
    """Damage that makes the load itself fail still reads as an integrity error naming the file."""
    m, o = trained()
    ckpt = str(tmp_path / "model.ckpt-1")
    reckpt.save_model(ckpt, m, o)
    target = os.path.join(ckpt, "model", _data_file(ckpt))
    flip_byte(target, offset)
    m2, o2 = fresh()
    with pytest.raises(IntegrityError, match=_data_file_name(target)):
        reckpt.restore_model(ckpt, m2, o2)
