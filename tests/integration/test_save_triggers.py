"""CheckpointManager.maybe_save in one process: TorchEasyRec's trigger cases, with real saves.

TorchEasyRec's own tests replace ``save`` with a mock; here every save writes a checkpoint, so
the cases also check what lands on disk (the stamped watermark, the dedupe sidecar).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import reckpt
from reckpt import DATA_TS_WATERMARK, EPOCHS_COMPLETED
from tests.helpers import trained


def _steps(root: Path) -> list[int]:
    return [c.step for c in reckpt.list_checkpoints(str(root)) if c.committed]


@pytest.fixture
def model() -> Any:
    return trained()[0]


def manager(root: Path, **policy: Any) -> reckpt.CheckpointManager:
    mgr = reckpt.CheckpointManager(str(root))
    settings = {"save_steps": 0, "save_epochs": 0, "ts_interval_s": 0, "ts_targets": [], "ts_quorum": 0.5}
    mgr.set_save_policy(**{**settings, **policy})
    return mgr


def test_step_interval(tmp_path: Path, model: Any) -> None:
    with manager(tmp_path, save_steps=10) as mgr:
        assert not mgr.maybe_save(5, model)
        assert mgr.maybe_save(10, model)
    assert _steps(tmp_path) == [10]


def test_epoch_interval(tmp_path: Path, model: Any) -> None:
    with manager(tmp_path, save_epochs=2) as mgr:
        assert not mgr.maybe_save(100, model, epoch=0)
        assert mgr.maybe_save(100, model, epoch=1)
    assert _steps(tmp_path) == [100]


def test_epoch_end_right_after_a_step_save_is_not_saved_again(tmp_path: Path, model: Any) -> None:
    with manager(tmp_path, save_steps=10, save_epochs=1) as mgr:
        assert mgr.maybe_save(10, model, dataloader_state={"a:0": 9})
        end_of_pass = {"a:0": 12, EPOCHS_COMPLETED: 1}
        assert not mgr.maybe_save(10, model, dataloader_state=end_of_pass, epoch=0)
    assert _steps(tmp_path) == [10]
    ck = str(tmp_path / "model.ckpt-10")
    assert reckpt.restore_dataloader_state(ck) == end_of_pass  # kept in the sidecar...
    assert reckpt.verify(ck).ok  # ...so the committed checkpoint still verifies


def test_final_save_is_deduplicated(tmp_path: Path, model: Any) -> None:
    with manager(tmp_path, save_steps=10) as mgr:
        assert mgr.maybe_save(10, model)
        assert not mgr.maybe_save(10, model, final=True)
        assert mgr.maybe_save(11, model, final=True)
    assert _steps(tmp_path) == [10, 11]


def test_event_time_first_time_seeds_then_a_boundary_saves(tmp_path: Path, model: Any) -> None:
    with manager(tmp_path, ts_interval_s=3600) as mgr:
        assert mgr.needs_worker_timestamps()
        assert not mgr.maybe_save(1, model, data_timestamp=3599.0)
        assert mgr.maybe_save(2, model, data_timestamp=3600.0)
        assert not mgr.maybe_save(3, model, data_timestamp=7199.0)
        assert mgr.maybe_save(4, model, data_timestamp=7200.5)
    assert _steps(tmp_path) == [2, 4]


def test_event_time_without_a_timestamp_never_seeds(tmp_path: Path, model: Any) -> None:
    with manager(tmp_path, ts_interval_s=3600) as mgr:
        assert not mgr.maybe_save(1, model, data_timestamp=-1.0)
        assert mgr._last_data_ts is None  # TorchEasyRec's attribute name
        assert not mgr.maybe_save(2, model, data_timestamp=3599.0)
        assert mgr._last_data_ts == 3599.0
        assert mgr.maybe_save(3, model, data_timestamp=3600.0)
    assert _steps(tmp_path) == [3]


def test_event_time_targets(tmp_path: Path, model: Any) -> None:
    with manager(tmp_path, ts_targets=[1500, 5000]) as mgr:
        assert not mgr.maybe_save(1, model, data_timestamp=1000.0)
        assert not mgr.maybe_save(2, model, data_timestamp=1400.0)
        assert mgr.maybe_save(3, model, data_timestamp=1500.0)  # reached exactly
        assert not mgr.maybe_save(4, model, data_timestamp=2000.0)  # never twice
        assert mgr.maybe_save(5, model, data_timestamp=9000.0)
    assert _steps(tmp_path) == [3, 5]


def test_watermark_goes_into_the_saved_state_only(tmp_path: Path, model: Any) -> None:
    state: dict[str, Any] = {"topic:0": 7}
    with manager(tmp_path, ts_interval_s=3600) as mgr:
        assert not mgr.maybe_save(1, model, dataloader_state=state, data_timestamp=3599.0)
        assert mgr.maybe_save(2, model, dataloader_state=state, data_timestamp=3600.0)
    assert state == {"topic:0": 7}  # the caller's dict is untouched
    saved = reckpt.restore_dataloader_state(str(tmp_path / "model.ckpt-2"))
    assert saved == {"topic:0": 7, DATA_TS_WATERMARK: 3600.0}


def test_a_step_save_also_advances_the_watermark(tmp_path: Path, model: Any) -> None:
    with manager(tmp_path, save_steps=3, ts_interval_s=3600) as mgr:
        assert not mgr.maybe_save(1, model, data_timestamp=100.0)
        assert mgr.maybe_save(3, model, dataloader_state={}, data_timestamp=3700.0)  # both fire
        assert mgr._last_data_ts == 3700.0
        assert not mgr.maybe_save(4, model, data_timestamp=7100.0)
    assert reckpt.restore_dataloader_state(str(tmp_path / "model.ckpt-3")) == {DATA_TS_WATERMARK: 3700.0}


def test_restore_seeds_the_watermark(tmp_path: Path, model: Any) -> None:
    """TorchEasyRec's case: a state saved with watermark 7200 (a plain folder) seeds the trigger."""
    plain = tmp_path / "state"
    reckpt.save_dataloader_state(str(plain), {"topic:0": 5, DATA_TS_WATERMARK: 7200.0})
    with manager(tmp_path / "run", ts_interval_s=3600) as mgr:
        state = mgr.restore_dataloader_state(str(plain))
        assert state is not None and state[DATA_TS_WATERMARK] == 7200.0
        assert not mgr.maybe_save(1, model, data_timestamp=7201.0)  # same bucket
        assert mgr.maybe_save(2, model, data_timestamp=10800.0)


def test_resume_with_restore_seeds_the_watermark(tmp_path: Path) -> None:
    m, o = trained()
    with manager(tmp_path, ts_interval_s=3600) as mgr:
        mgr.maybe_save(1, m, o, dataloader_state={"topic:0": 1}, data_timestamp=3000.0)
        assert mgr.maybe_save(2, m, o, dataloader_state={"topic:0": 2}, data_timestamp=3650.0)
    with manager(tmp_path, ts_interval_s=3600) as mgr2:
        info = mgr2.restore(str(tmp_path / "model.ckpt-2"), *trained(seed=1))
        assert info.dataloader_state == {"topic:0": 2, DATA_TS_WATERMARK: 3650.0}
        assert not mgr2.maybe_save(3, m, o, data_timestamp=3700.0)  # no first-batch reseed, no save
        assert mgr2.maybe_save(4, m, o, data_timestamp=7200.0)
    assert _steps(tmp_path) == [2, 4]


@pytest.mark.parametrize(
    ("policy", "match"),
    [
        ({"ts_interval_s": 3600, "ts_quorum": 0.0}, r"ts_quorum must be in \(0, 1\]"),
        ({"ts_targets": [10], "ts_quorum": 2}, r"ts_quorum must be in \(0, 1\]"),
        ({"ts_interval_s": -5}, r"ts_interval_s must be >= 0"),
        ({"save_steps": -1}, r"save_steps must be >= 0"),
    ],
)
def test_set_save_policy_refuses(tmp_path: Path, policy: dict[str, Any], match: str) -> None:
    mgr = reckpt.CheckpointManager(str(tmp_path))
    with pytest.raises(ValueError, match=match):
        mgr.set_save_policy(**policy)
    mgr.set_save_policy(ts_quorum=0.0)  # no event-time trigger: the quorum is not used
    assert not mgr.needs_worker_timestamps()


def test_tzrec_private_names_and_a_replaced_save(tmp_path: Path) -> None:
    """Code written against TorchEasyRec's manager: its private names, and ``save`` swapped out."""
    calls: list[tuple[Any, ...]] = []

    def save(*args: Any, **kwargs: Any) -> str:
        calls.append(args)
        return "ckpt"

    mgr = manager(tmp_path, ts_interval_s=3600)
    mgr.save = save  # what TorchEasyRec's tests do with a mock
    assert mgr._reconcile_event_time(1717000000.0) == 1717000000.0
    assert mgr._reconcile_event_time(-1.0) is None
    assert manager(tmp_path)._reconcile_event_time(1717000000.0) is None
    state: dict[str, Any] = {}
    assert not mgr.maybe_save(1, None, dataloader_state=state, data_timestamp=3599.0)
    assert mgr.maybe_save(2, None, dataloader_state=state, data_timestamp=3600.0)
    assert not mgr.maybe_save(2, None, final=True)  # deduplicated though save() was replaced
    assert len(calls) == 1 and calls[0][3] == {DATA_TS_WATERMARK: 3600.0} and state == {}
    mgr.close()
