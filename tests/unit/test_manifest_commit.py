from __future__ import annotations

from typing import Any, ClassVar

import pytest

from reckpt.commit.state import OwnerRecord, is_stale
from reckpt.errors import IntegrityError
from reckpt.format.dataloader_state import merge_dataloader_states, update_dataloder_state
from reckpt.format.integrity import FileRecord
from reckpt.format.manifest import Manifest, TensorEntry
from reckpt.report import LoadReport
from reckpt.sharding.plan import plan_to_json


def test_manifest_roundtrip() -> None:
    m = Manifest(
        step=5,
        world_size=2,
        entries={"model": [TensorEntry("w", [2, 3], "float32", 24)]},
        files={"model/__0_0.distcp": FileRecord("model/__0_0.distcp", 10, "ab")},
        user_metadata={"k": [1, 2]},
        library_version="0.1.0",
    )
    back = Manifest.from_json(m.to_json(), "x")
    assert back == m


@pytest.mark.parametrize(
    "blob",
    [b"not json", b"{}", b'{"format_version": 99}', b'{"format_version": 1, "files": {"../x": {}}}'],
)
def test_manifest_rejects_garbage(blob: bytes) -> None:
    with pytest.raises(IntegrityError, match=r"^x: "):
        Manifest.from_json(blob, "x")


def _owner(host: str = "h", pid: int = 1, beat: float = 100.0) -> OwnerRecord:
    return OwnerRecord(host, pid, "t", "target", 0.0, beat)


@pytest.mark.parametrize(
    ("owner", "now", "alive", "stale"),
    [
        (None, 0.0, True, True),
        (_owner(), 110.0, True, False),  # same host, alive, fresh heartbeat
        (_owner(), 110.0, False, True),  # same host, process gone
        (_owner(host="other"), 110.0, False, False),  # other host: only the heartbeat tells
        (_owner(host="other"), 1000.0, True, True),  # heartbeat too old
    ],
)
def test_is_stale(owner, now, alive, stale) -> None:
    assert is_stale(owner, now=now, host="h", pid_alive=lambda _: alive, stale_after_s=300) is stale


def test_dataloader_merge_and_update() -> None:
    assert merge_dataloader_states([{"a:0": 5, "b:0": 1}, {"a:0": 3, "c:0": 9}, None]) == {
        "a:0": 5,
        "b:0": 1,
        "c:0": 9,
    }
    state = {"a:0": 1}
    update_dataloder_state(state, {"a:0": 4, "b:1": 2})
    update_dataloder_state(state, None)
    assert state == {"a:0": 4, "b:1": 2}


def test_plan_to_json_from_objects_and_dicts() -> None:
    class PS:
        sharding_type, compute_kernel, ranks = "row_wise", "fused", [0, 1]

    class Plan:
        plan: ClassVar[dict[str, Any]] = {"model.ebc": {"t": PS()}}

    want = {"model.ebc": {"t": {"sharding_type": "row_wise", "compute_kernel": "fused", "ranks": [0, 1]}}}
    assert plan_to_json(Plan()) == want
    assert plan_to_json(want) == want


def test_load_report_summary() -> None:
    r = LoadReport("ck")
    r.part("model").missing.append("x")
    assert r.missing_keys == ["x"] and "missing: x" in r.summary()
