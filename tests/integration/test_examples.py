"""The library example runs end to end (it is documented in the README)."""

from __future__ import annotations

import importlib.util

from tests.helpers.paths import REPO


def test_quickstart(tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("quickstart", REPO / "examples" / "quickstart.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--model-dir", str(tmp_path / "model_dir"), "--steps", "5"]) == 0
