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


def test_demo_config_reads_the_columns_make_data_writes(tmp_path) -> None:
    """examples/demo.toml (README) validates and names exactly the columns `reckpt make-data`
    writes, the sequence feature included, and trains through TorchRec's pipeline."""
    from reckpt.trainer.config import load_config
    from reckpt.trainer.data import make_data

    cfg = load_config(str(REPO / "examples" / "demo.toml")).validate("examples/demo.toml")
    written = make_data(str(tmp_path), rows=20, eval_rows=10)
    for columns in ("dense_columns", "sparse_columns", "sequence_columns", "label"):
        assert getattr(cfg.data, columns) == getattr(written, columns), columns
    assert cfg.data.sequence_columns == ["h0"] and cfg.train_config.pipeline is True


def test_every_example_config_validates() -> None:
    """The tiered and dynamic-table variants of the demo (README) are valid configs."""
    from reckpt.trainer.config import load_config

    for name in ("demo_tiers.toml", "demo_dynamic.toml"):
        load_config(str(REPO / "examples" / name)).validate(f"examples/{name}")
    tiered = load_config(str(REPO / "examples" / "demo_tiers.toml")).validate("demo_tiers.toml")
    tiers = tiered.tiers()
    assert tiers is not None and [t.name for t in tiers] == ["memory", "local", "durable"]
    assert tiers[-1].url == "model_dir" and tiers[-1].keep_best
