"""reckpt deletes or replaces only what it wrote: every destructive path leaves foreign
entries byte for byte, on local disk and on ``s3://`` (moto's server).

Foreign entries are planted in the target folder and next to it: a file, a subfolder, a
``model.ckpt-7-notes`` folder, a symlink out of the tree (local only) and a hand-made
``model.ckpt-9/`` holding only a readme.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch

import reckpt
from reckpt.errors import ConfigError
from reckpt.storage.core import storage_for
from tests.helpers import fresh, optim_states_equal, state_dicts_equal, trained
from tests.helpers.processes import reckpt_cli, run_python

BACKENDS = ["local", "s3"]


@pytest.fixture(params=BACKENDS)
def run(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "run")
    return str(request.getfixturevalue("s3_root")) + "/run"


def _fs(url: str) -> tuple[Any, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/")


def plant(folder: str, outside: Path) -> dict[str, bytes | str]:
    """Plant foreign entries into ``folder``; returns what must survive (path -> content)."""
    fs, base = _fs(folder)
    files = {
        "notes.txt": b"my notes\n",
        "sub/deeper/data.bin": os.urandom(300),
        "model.ckpt-7-notes/todo.md": b"- try a wider tower\n",
        "model.ckpt-9/readme.md": b"hand-made, not a checkpoint\n",
    }
    for rel, data in files.items():
        _put(fs, f"{base}/{rel}", data)
    expected: dict[str, bytes | str] = dict(files)
    if "://" not in folder:  # a symlink out of the tree
        outside.mkdir(parents=True, exist_ok=True)
        (outside / "precious.txt").write_bytes(b"outside the tree\n")
        os.symlink(outside, os.path.join(folder, "link-out"))
        expected["link-out"] = f"symlink:{outside}"
    return expected


def _put(fs: Any, path: str, data: bytes) -> None:
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data)


def assert_survived(folder: str, expected: dict[str, bytes | str], outside: Path) -> None:
    fs, base = _fs(folder)
    for rel, want in expected.items():
        if isinstance(want, str):
            link = os.path.join(folder, rel)
            assert os.path.islink(link) and os.readlink(link) == want.removeprefix("symlink:"), rel
            assert (outside / "precious.txt").read_bytes() == b"outside the tree\n"
            continue
        assert fs.cat_file(f"{base}/{rel}") == want, f"{folder}/{rel} changed or vanished"


def _save(path: str, seed: int = 0, **kw: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    m, o = trained(seed=seed)
    reckpt.save_model(path, m, o, **kw)
    return m, o


def _restores(path: str, m: torch.nn.Module, o: torch.optim.Optimizer) -> None:
    assert reckpt.verify(path).ok
    m2, o2 = fresh()
    reckpt.restore_model(path, m2, o2)
    assert state_dicts_equal(m2.state_dict(), m.state_dict()) and optim_states_equal(o2, o)


def test_save_into_a_folder_with_other_files_keeps_them(run: str, tmp_path: Path) -> None:
    target = f"{run}/model.ckpt-5"
    storage_for(target).makedirs(target)
    inside = plant(target, tmp_path / "out1")
    beside = plant(run, tmp_path / "out2")
    m, o = _save(target)
    assert_survived(target, inside, tmp_path / "out1")
    assert_survived(run, beside, tmp_path / "out2")
    _restores(target, m, o)
    # and again with overwrite=True: the checkpoint members are replaced, the rest stays
    m, o = _save(target, seed=3, overwrite=True)
    assert_survived(target, inside, tmp_path / "out1")
    assert_survived(run, beside, tmp_path / "out2")
    _restores(target, m, o)
    assert reckpt.latest_checkpoint(run) == (target, 5)


def test_overwrite_drops_the_old_extra_state_but_keeps_foreign(run: str, tmp_path: Path) -> None:
    target = f"{run}/model.ckpt-5"
    sched = torch.optim.lr_scheduler.StepLR(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))]), 2)
    _save(target, extra_states={"lr_scheduler": sched})
    inside = plant(target, tmp_path / "out")
    _save(target, seed=2, overwrite=True)
    fs, base = _fs(target)
    assert not fs.exists(f"{base}/lr_scheduler"), "the old save's extra state is reckpt's: replaced"
    assert_survived(target, inside, tmp_path / "out")


def test_a_model_dir_is_never_a_save_target(run: str, tmp_path: Path) -> None:
    _save(f"{run}/model.ckpt-1")
    beside = plant(run, tmp_path / "out")
    fs, base = _fs(run)
    before = sorted(fs.find(base))
    with pytest.raises(ConfigError, match=r"is a model_dir .*model\.ckpt-1.*model\.ckpt-<step>"):
        _save(run)
    assert sorted(fs.find(base)) == before, "nothing may be written"
    assert_survived(run, beside, tmp_path / "out")
    # an eval results file alone marks a model_dir too
    other = f"{run}-2"
    _put(fs, f"{_fs(other)[1]}/train_eval_result_v2.txt", b'{"global_step": 1, "auc": 0.5}\n')
    with pytest.raises(ConfigError, match="model_dir"):
        _save(other)


def test_a_foreign_entry_named_like_an_extra_state_is_refused(run: str) -> None:
    target = f"{run}/model.ckpt-3"
    fs, base = _fs(target)
    _put(fs, f"{base}/lr_scheduler", b"mine")
    sched = torch.optim.lr_scheduler.StepLR(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))]), 2)
    with pytest.raises(ConfigError, match=r"lr_scheduler.*not written by reckpt"):
        _save(target, extra_states={"lr_scheduler": sched})
    assert fs.cat_file(f"{base}/lr_scheduler") == b"mine"
    assert not reckpt.is_committed(target)


def test_pruning_keeps_foreign_entries(run: str, tmp_path: Path) -> None:
    beside = plant(run, tmp_path / "out1")
    with reckpt.CheckpointManager(run, keep_checkpoint_max=1) as mgr:
        m, o = trained()
        mgr.save(10, m, o)
        inside = plant(f"{run}/model.ckpt-10", tmp_path / "out2")
        mgr.save(20, m, o)
        mgr.save(30, m, o)
    assert [c.step for c in reckpt.list_checkpoints(run) if c.committed] == [30]
    assert not reckpt.is_committed(f"{run}/model.ckpt-10")
    assert_survived(f"{run}/model.ckpt-10", inside, tmp_path / "out2")
    fs, base = _fs(f"{run}/model.ckpt-10")
    assert not fs.exists(f"{base}/model") and not fs.exists(f"{base}/reckpt.json")
    assert not fs.exists(f"{_fs(run)[1]}/model.ckpt-20")
    assert_survived(run, beside, tmp_path / "out1")
    assert [p for p in fs.ls(_fs(run)[1], detail=False) if ".reckpt-" in p] == []


def test_cli_prune_keeps_foreign_entries(run: str, tmp_path: Path) -> None:
    for step in (1, 2, 3):
        _save(f"{run}/model.ckpt-{step}")
    inside = plant(f"{run}/model.ckpt-1", tmp_path / "out1")
    beside = plant(run, tmp_path / "out2")
    out = reckpt_cli("prune", run, "--keep-last", "1")
    assert out.returncode == 0, out.stderr
    assert [c.step for c in reckpt.list_checkpoints(run) if c.committed] == [3]
    assert_survived(f"{run}/model.ckpt-1", inside, tmp_path / "out1")
    assert_survived(run, beside, tmp_path / "out2")


def test_cleanup_of_crash_debris_keeps_foreign_and_incomplete_folders(run: str, tmp_path: Path) -> None:
    beside = plant(run, tmp_path / "out")
    fs, base = _fs(run)
    _put(fs, f"{base}/model.ckpt-4/half/x.bin", b"an incomplete folder someone made")
    _save(f"{run}/model.ckpt-8")  # a save cleans up debris next to its target first
    _save(f"{run}/model.ckpt-9", overwrite=False)  # the hand-made folder with a readme
    assert fs.cat_file(f"{base}/model.ckpt-4/half/x.bin") == b"an incomplete folder someone made"
    assert_survived(run, beside, tmp_path / "out")
    assert [c.step for c in reckpt.list_checkpoints(run) if c.committed] == [8, 9]


def test_convert_never_replaces_a_file_it_did_not_write(run: str, tmp_path: Path) -> None:
    ckpt = f"{run}/model.ckpt-1"
    _save(ckpt)
    beside = plant(run, tmp_path / "out")
    fs, base = _fs(run)
    dst = f"{run}/notes.txt"
    out = reckpt_cli("convert", ckpt, dst, "--format", "safetensors")
    assert out.returncode != 0 and "--overwrite" in out.stderr
    assert_survived(run, beside, tmp_path / "out")
    fresh_dst = f"{run}/export/w.safetensors"
    assert reckpt_cli("convert", ckpt, fresh_dst).returncode == 0
    first = fs.cat_file(f"{base}/export/w.safetensors")
    assert reckpt_cli("convert", ckpt, fresh_dst).returncode != 0
    assert reckpt_cli("convert", ckpt, fresh_dst, "--overwrite").returncode == 0
    assert fs.cat_file(f"{base}/export/w.safetensors") == first
    assert [p for p in fs.ls(f"{base}/export", detail=False) if "/.reckpt" in p] == []
    # file -> checkpoint, into a folder holding other files
    src = tmp_path / "w.pt"
    torch.save(trained()[0].state_dict(), src)
    target = f"{run}/model.ckpt-2"
    fs.makedirs(f"{base}/model.ckpt-2", exist_ok=True)
    inside = plant(target, tmp_path / "out2")
    assert reckpt_cli("convert", str(src), target).returncode == 0
    assert reckpt.is_committed(target)
    assert_survived(target, inside, tmp_path / "out2")
    assert_survived(run, beside, tmp_path / "out")


def test_delta_chain_save_and_prune_keep_foreign(run: str, tmp_path: Path) -> None:
    from reckpt.delta.row_tracker import RowTracker
    from reckpt.delta.save import save_delta
    from tests.helpers import TinyRec, train

    torch.manual_seed(0)
    m = TinyRec(rows=50)
    o = torch.optim.Adagrad(m.parameters(), lr=0.1)
    tracker = RowTracker(m, tables=["emb.user.weight"])
    train(m, o, steps=2, seed=1)
    base = reckpt.save_model(f"{run}/model.ckpt-1", m, o)
    tracker.clear()
    train(m, o, steps=2, seed=2)
    target = f"{run}/model.delta-2"
    storage_for(target).makedirs(target)
    inside = plant(target, tmp_path / "out")
    save_delta(target, m, o, tracker, base)
    assert reckpt.is_committed(target)
    assert_survived(target, inside, tmp_path / "out")
    reckpt.save_model(f"{run}/model.ckpt-3", m, o)
    assert reckpt_cli("prune", run, "--keep-last", "1").returncode == 0
    assert [c.step for c in reckpt.list_checkpoints(run) if c.committed] == [3]
    assert not reckpt.is_committed(target)
    assert_survived(target, inside, tmp_path / "out")


_KILLED_SAVE = """
import sys, reckpt
from tests.helpers import trained
m, o = trained(seed=1)
reckpt.save_model(sys.argv[1], m, o, overwrite=True)
"""


@pytest.mark.parametrize(
    ("backend", "point", "survivor"),
    [
        ("local", "replace_recorded", 0),
        ("local", "replace_moved_aside", 0),  # between the two renames: the old one is put back
        ("local", "replace_swapped", 1),
        ("local", "foreign_returned", 1),  # after the first foreign entry moved back
        ("s3", "delete_marked", None),  # object stores replace in place: the old one goes first
        ("s3", "delete_unmanifested", None),
        ("s3", "after_manifest", 1),
    ],
)
def test_a_kill_while_replacing_loses_no_foreign_entry(
    backend: str, point: str, survivor: int | None, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from reckpt.commit.removal import cleanup_stale

    run = str(tmp_path / "run") if backend == "local" else str(request.getfixturevalue("s3_root")) + "/run"
    target = f"{run}/model.ckpt-5"
    storage_for(target).makedirs(target)
    inside = plant(target, tmp_path / "out1")
    beside = plant(run, tmp_path / "out2")
    old = _save(target, seed=0)
    proc = run_python("-c", _KILLED_SAVE, target, env={"RECKPT_FAULT_KILL_AT": point})
    assert proc.returncode == -9, proc.stderr[-2000:]
    st = storage_for(run)
    cleanup_stale(st, run, stale_after_s=0.0)  # the next start
    assert_survived(target, inside, tmp_path / "out1")
    assert_survived(run, beside, tmp_path / "out2")
    assert [n for n in st.ls(run) if n.startswith(".reckpt-")] == []
    if survivor is None:
        assert not reckpt.is_committed(target)
    else:
        _restores(target, *(old if survivor == 0 else trained(seed=1)))
