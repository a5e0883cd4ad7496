"""Saves still work where no thread can be started (Python 3.12.0-3.12.2 at interpreter exit).

An async save of a manager that was never closed finishes while the interpreter shuts down;
those Python versions refuse to start threads then. ``scripts/test_python312.sh`` shows the
real case (tests/integration/test_preemption.py, test_exit_drain.py); here the refusal is
injected on 3.11 so the suite's main interpreter covers it too.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

import pytest

import reckpt
from reckpt.format.integrity import hash_stream
from tests.helpers import fresh, state_dicts_equal, trained


@pytest.fixture
def no_new_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(threading.Thread, "start", refuse)


def test_hash_stream_hashes_inline(no_new_threads: None) -> None:
    data = bytes(range(256)) * 65536  # 16 MiB: large enough for the helper thread
    assert hash_stream(io.BytesIO(data))[0] == len(data)


def test_save_and_restore_without_threads(tmp_path: Path, no_new_threads: None) -> None:
    model, opt = trained()
    ckpt = str(tmp_path / "run" / "model.ckpt-1")
    reckpt.save_model(ckpt, model, opt)
    assert reckpt.verify(ckpt).ok
    other, other_opt = fresh()
    reckpt.restore_model(ckpt, other, other_opt)
    assert state_dicts_equal(model.state_dict(), other.state_dict())
