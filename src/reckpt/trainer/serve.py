"""``reckpt eval`` / ``export`` / ``predict``: evaluate a checkpoint, export it, score with it.

The export is a serving artifact that a plain single process loads (no process group, no
sharding): ``model.safetensors`` (unsharded weights) and ``model_config.json`` (the model and
data sections of the config, the source checkpoint and its step).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import torch

import reckpt
from reckpt.errors import CheckpointNotFoundError, ConfigError
from reckpt.eval_results import EVAL_RESULT_FILENAME, append_eval_result
from reckpt.inspection import read_part
from reckpt.storage import storage_for
from reckpt.trainer.config import Config, DataConfig, ModelConfig
from reckpt.trainer.data import ParquetReader, input_files
from reckpt.trainer.model import build_model, init_distributed, shard_model, table_rows
from reckpt.trainer.train import evaluate

__all__ = ["eval_checkpoint", "export_model", "predict", "load_exported"]

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"


def _pick(
    cfg: Config, checkpoint_path: str | None, *, per_export_config: bool = True
) -> tuple[str, int | None]:
    """The explicit checkpoint, else the best (``exporter_type = "best"``) or latest in model_dir."""
    if checkpoint_path:
        path, step = reckpt.latest_checkpoint(checkpoint_path)
        if path is None:
            raise CheckpointNotFoundError(
                f"--checkpoint-path {checkpoint_path}: no committed checkpoint there"
            )
        return path, step
    if per_export_config and cfg.export_config.exporter_type == "best":
        path, step = reckpt.best_checkpoint(cfg.model_dir, cfg.export_config)
    else:
        path, step = reckpt.latest_checkpoint(cfg.model_dir)
    if path is None:
        raise CheckpointNotFoundError(f"model_dir {cfg.model_dir}: no committed checkpoint to use")
    return path, step


def eval_checkpoint(cfg: Config, checkpoint_path: str | None = None) -> dict[str, float]:
    """Collective: restore a checkpoint (latest by default) and evaluate it; rank 0 appends
    the result to ``model_dir/eval_result.txt`` (``global_step`` null for an explicit path)."""
    init_distributed()
    path, step = _pick(cfg, checkpoint_path, per_export_config=False)
    model, _ = shard_model(cfg, build_model(cfg))
    with reckpt.lease(path, holder="reckpt eval"):
        reckpt.restore_model(path, model)
    metrics = evaluate(cfg, model)
    if torch.distributed.get_rank() == 0:
        st = storage_for(cfg.model_dir)
        append_eval_result(
            st,
            f"{cfg.model_dir.rstrip('/')}/{EVAL_RESULT_FILENAME}",
            None if checkpoint_path else step,
            metrics,
        )
    return metrics


def export_model(cfg: Config, export_dir: str, checkpoint_path: str | None = None) -> str:
    """Write the serving artifact of the best or latest checkpoint (per ``export_config``)."""
    from safetensors.torch import save_file

    path, step = _pick(cfg, checkpoint_path)
    with reckpt.lease(path, holder="reckpt export"):
        weights = read_part(path, "model")
    expected = set(build_model(cfg, device="meta").state_dict())
    if set(weights) != expected:
        raise ConfigError(
            f"{path}: the checkpoint's model does not match the config's model (missing"
            f" {sorted(expected - set(weights))[:5]}, unexpected {sorted(set(weights) - expected)[:5]})"
        )
    os.makedirs(export_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(export_dir, WEIGHTS))
    doc = {
        "model": dataclasses.asdict(cfg.model),
        "data": dataclasses.asdict(cfg.data),
        "checkpoint": path,
        "step": step,
        "format": "reckpt-dlrm-v1",
    }
    with open(os.path.join(export_dir, MODEL_CONFIG), "w") as f:
        json.dump(doc, f, indent=2)
    return path


def load_exported(export_dir: str) -> tuple[torch.nn.Module, Config]:
    """A plain single-process model from an export (no process group needed)."""
    from safetensors.torch import load_file

    cfg_path = os.path.join(export_dir, MODEL_CONFIG)
    if not os.path.isfile(cfg_path):
        raise CheckpointNotFoundError(
            f"--export-dir {export_dir}: no {MODEL_CONFIG}; run `reckpt export` first"
        )
    with open(cfg_path) as f:
        doc = json.load(f)
    cfg = Config(model=ModelConfig(**doc["model"]), data=DataConfig(**doc["data"]))
    model = build_model(cfg)
    model.load_state_dict(load_file(os.path.join(export_dir, WEIGHTS)))
    model.eval()
    return model, cfg


def predict(export_dir: str, input_path: str, output_path: str, batch_size: int = 1024) -> torch.Tensor:
    """Score a Parquet file with an exported model; writes ``score`` (click probability) to Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    model, cfg = load_exported(export_dir)
    cfg.data.batch_size = batch_size
    reader = ParquetReader(input_files(input_path, "--input"), cfg.data, 0, 1, table_rows(cfg))
    scores = []
    with torch.no_grad():
        for b in reader.batches():
            scores.append(torch.sigmoid(model(b.dense, b.sparse).squeeze(-1)))
    out = torch.cat(scores)
    pq.write_table(pa.table({"score": out.numpy()}), output_path)
    return out
