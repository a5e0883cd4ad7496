"""The event-time trigger in one process (reckpt.lifecycle.event_time); several ranks: tests/distributed."""

from __future__ import annotations

import pytest

from reckpt.errors import ConfigError
from reckpt.format.dataloader_state import DATA_TS_WATERMARK
from reckpt.lifecycle.event_time import EventTimeTrigger, stamp_watermark


def trigger(
    interval_s: float = 3600, targets: tuple[float, ...] = (), quorum: float = 0.5
) -> EventTimeTrigger:
    t = EventTimeTrigger()
    t.configure(interval_s, targets, quorum)
    return t


def test_reconcile_in_one_process() -> None:
    """TorchEasyRec's _reconcile_event_time case: this rank's time passes, -1 and 'off' give None."""
    assert trigger().reconcile(1717000000.0) == 1717000000.0
    assert trigger().reconcile(-1.0) is None
    assert EventTimeTrigger().reconcile(1717000000.0) is None
    assert not EventTimeTrigger().enabled and trigger().enabled and trigger(0, (5.0,)).enabled


def test_first_time_only_seeds_then_boundaries_fire() -> None:
    t = trigger()
    assert not t.fires(None) and t.last is None  # no time: never the reference
    assert not t.fires(3599.0) and t.last == 3599.0  # the first time seeds, never saves
    assert not t.fires(3599.5)
    assert t.fires(3600.0)
    assert t.last == 3599.0  # only a save advances it
    t.saved(3600.0)
    assert not t.fires(7199.0) and t.fires(7200.0)


@pytest.mark.parametrize(
    ("state", "want"),
    [
        ({"topic:0": 5, DATA_TS_WATERMARK: 7200.0}, 7200.0),
        ({"topic:0": 5, DATA_TS_WATERMARK: 7200}, 7200.0),
        ({"topic:0": 5}, None),  # a checkpoint without a watermark: seed from the first batch
    ],
)
def test_seed(state, want) -> None:
    t = trigger()
    t.saved(100.0)
    t.seed(state)
    assert t.last == want
    t.seed(None)  # no state at all: the reference is left alone
    assert t.last == want


def test_stamp_copies() -> None:
    state = {"a:0": 1}
    assert stamp_watermark(state, 3600.0) == {"a:0": 1, DATA_TS_WATERMARK: 3600.0}
    assert stamp_watermark(state, None) == {"a:0": 1} and stamp_watermark(None, 1.0) is None
    assert state == {"a:0": 1}


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((3600, (), 0.0), r"ts_quorum must be in \(0, 1\] when ts_interval_s or ts_targets is set, got 0.0"),
        ((0, (5.0,), 1.5), r"ts_quorum must be in \(0, 1\].*got 1.5"),
        ((3600, (), float("nan")), r"ts_quorum must be in \(0, 1\]"),
        ((-1, (), 0.5), r"ts_interval_s must be >= 0 \(0 turns it off\), got -1"),
        ((0, (float("inf"),), 0.5), r"ts_targets must be finite Unix times"),
    ],
)
def test_configure_refuses(args, match) -> None:
    with pytest.raises(ConfigError, match=match):
        EventTimeTrigger().configure(*args)
    assert issubclass(ConfigError, ValueError)


def test_quorum_unchecked_while_off() -> None:
    EventTimeTrigger().configure(0, (), 0.0)  # TorchEasyRec accepts any quorum with no trigger
