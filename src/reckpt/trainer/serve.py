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
from typing import Any

import torch

import reckpt
from reckpt.delta.quant import ENCODINGS, decode_rows, encode_rows
from reckpt.dynamic.dump import dynamic_writer
from reckpt.dynamic.load import load_dynamic
from reckpt.errors import CheckpointNotFoundError, ConfigError, IntegrityError
from reckpt.format.eval_results import EVAL_RESULT_FILENAME, append_eval_result
from reckpt.format.integrity import hash_stream
from reckpt.format.manifest import read_manifest
from reckpt.format.verification import require_committed
from reckpt.naming import DYNAMICEMB_DIR, parse_delta_step
from reckpt.restore.inspection import part_values
from reckpt.storage.core import storage_for
from reckpt.trainer.config import Config, DataConfig, ModelConfig, build_section
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
    if checkpoint_path and parse_delta_step(checkpoint_path) is not None:
        require_committed(storage_for(checkpoint_path), checkpoint_path.rstrip("/"))
        return checkpoint_path.rstrip("/"), parse_delta_step(checkpoint_path)
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


def eval_checkpoint(
    cfg: Config, checkpoint_path: str | None = None, *, verify: bool = True
) -> dict[str, float]:
    """Collective: restore a checkpoint (latest by default) and evaluate it; rank 0 appends
    the result to ``model_dir/eval_result.txt`` (``global_step`` null for an explicit path)."""
    init_distributed()
    path, step = _pick(cfg, checkpoint_path, per_export_config=False)
    model, _ = shard_model(cfg, build_model(cfg))
    with reckpt.lifecycle.lease(path, holder="reckpt eval"):
        reckpt.restore_model(path, model, verify=verify)
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


def _checkpoint_weights(
    cfg: Config, path: str, verify: bool = True
) -> tuple[dict[str, torch.Tensor], torch.nn.Module | None]:
    """The unsharded weights of a checkpoint, and the restored plain model when one was needed.

    A full checkpoint without dynamic tables streams its ``model/`` part; a delta (its chain)
    or a checkpoint with dynamic tables is restored into a plain single-process model. Both
    check sizes and checksums first unless ``verify`` is off.
    """
    storage = storage_for(path)
    manifest = read_manifest(storage, path)
    dynamic = manifest is not None and any(f.startswith(f"{DYNAMICEMB_DIR}/") for f in manifest.files)
    if parse_delta_step(path) is None and not dynamic:
        return part_values(storage, path, "model", verify=verify), None
    model = build_model(cfg)
    reckpt.restore_model(path, model, verify=verify)
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}, model


def _table_keys(weights: dict[str, torch.Tensor]) -> list[str]:
    """The embedding tables' keys: the bags' and the sequence features' (``EmbeddingCollection``)."""
    tables = (".embedding_bags.", ".embeddings.")
    return sorted(k for k in weights if any(t in k for t in tables) and weights[k].dim() == 2)


def export_model(
    cfg: Config,
    export_dir: str,
    checkpoint_path: str | None = None,
    quantize: str = "raw",
    *,
    verify: bool = True,
) -> str:
    """Write the serving artifact of the best or latest checkpoint (per ``export_config``).

    Args:
        quantize: embedding tables as ``"raw"`` (default, lossless), ``"int8"`` (row-wise
            uint8 + fp16 scale and offset, TorchEasyRec's ``QUint8RowwiseF16``) or ``"fp16"``.
        verify: check the checkpoint's sizes and checksums before exporting (a damaged
            checkpoint raises ``IntegrityError``); ``False`` salvages what is readable.
    """
    from safetensors.torch import save_file

    if quantize not in ENCODINGS:
        raise ConfigError(f"--quantize must be one of {list(ENCODINGS)}, got {quantize!r}")
    path, step = _pick(cfg, checkpoint_path)
    with reckpt.lifecycle.lease(path, holder="reckpt export"):
        weights, restored = _checkpoint_weights(cfg, path, verify)
    expected = set(build_model(cfg, device="meta").state_dict())
    if set(weights) != expected:
        raise ConfigError(
            f"{path}: the checkpoint's model does not match the config's model (missing"
            f" {sorted(expected - set(weights))[:5]}, unexpected {sorted(set(weights) - expected)[:5]})"
        )
    tables = _table_keys(weights) if quantize != "raw" else []
    for key in tables:
        w = weights[key]
        raw = encode_rows(w, quantize, key)
        weights[key] = torch.frombuffer(
            bytearray(raw), dtype=torch.uint8 if quantize == "int8" else torch.float16
        )
        weights[key] = weights[key].reshape(w.shape[0], -1)
    os.makedirs(export_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(export_dir, WEIGHTS))
    writer = dynamic_writer(restored) if restored is not None else None
    files = {WEIGHTS: _record(export_dir, WEIGHTS)}
    if writer is not None:  # dynamic tables: their rows in the checkpoint layout, one shard
        files.update(
            {
                rel: {"size": r.size, "checksum": r.checksum}
                for rel, r in writer(storage_for(export_dir), export_dir).items()
            }
        )
    doc = {
        "files": files,  # sizes and checksums: predict checks them before loading
        "model": dataclasses.asdict(cfg.model),
        "data": dataclasses.asdict(cfg.data),
        "checkpoint": path,
        "step": step,
        "format": "reckpt-dlrm-v1",
        "quantization": {"encoding": quantize, "tables": tables},
        "dynamic_tables": writer is not None,
    }
    with open(os.path.join(export_dir, MODEL_CONFIG), "w") as f:
        json.dump(doc, f, indent=2)
    return path


def _record(export_dir: str, rel: str) -> dict[str, Any]:
    with open(os.path.join(export_dir, rel), "rb") as f:
        size, checksum = hash_stream(f)
    return {"size": size, "checksum": checksum}


def _check_export(export_dir: str, files: dict[str, Any]) -> None:
    """Compare an export's files with the sizes and checksums its config recorded."""
    problems = []
    for rel, want in sorted(files.items()):
        path = os.path.join(export_dir, rel)
        if not os.path.isfile(path):
            problems.append(f"{path}: missing")
            continue
        got = _record(export_dir, rel)
        if got != want:
            problems.append(
                f"{path}: size {got['size']} checksum {got['checksum']}, the export recorded {want}"
            )
    if problems:
        raise IntegrityError(
            f"--export-dir {export_dir}: the export is damaged ({'; '.join(problems)}); export again,"
            " or pass --no-verify to use it anyway"
        )


def load_exported(export_dir: str, *, verify: bool = True) -> tuple[torch.nn.Module, Config]:
    """A plain single-process model from an export (no process group needed).

    With ``verify`` (the default) the export's files are checked against the sizes and
    checksums ``reckpt export`` recorded (older exports carry none to check).
    """
    from safetensors.torch import load_file

    cfg_path = os.path.join(export_dir, MODEL_CONFIG)
    if not os.path.isfile(cfg_path):
        raise CheckpointNotFoundError(
            f"--export-dir {export_dir}: no {MODEL_CONFIG}; run `reckpt export` first"
        )
    with open(cfg_path) as f:
        doc = json.load(f)
    if verify and doc.get("files"):
        _check_export(export_dir, doc["files"])
    cfg = Config(
        model=build_section(ModelConfig, doc["model"], "model", cfg_path),
        data=build_section(DataConfig, doc["data"], "data", cfg_path),
    )
    model = build_model(cfg)
    weights = load_file(os.path.join(export_dir, WEIGHTS))
    quant = doc.get("quantization") or {"encoding": "raw", "tables": []}
    current = model.state_dict()
    for key in quant["tables"]:
        shape = tuple(current[key].shape)
        raw = weights[key].contiguous().numpy().tobytes()
        weights[key] = decode_rows(raw, quant["encoding"], shape, current[key].dtype)
    model.load_state_dict(weights)
    if doc.get("dynamic_tables"):
        load_dynamic(export_dir, model)
    model.eval()
    return model, cfg


def predict(
    export_dir: str, input_path: str, output_path: str, batch_size: int = 1024, *, verify: bool = True
) -> torch.Tensor:
    """Score a Parquet file with an exported model; writes ``score`` (click probability) to Parquet.

    The export is checked first (:func:`load_exported`) unless ``verify`` is off.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    model, cfg = load_exported(export_dir, verify=verify)
    cfg.data.batch_size = batch_size
    reader = ParquetReader(input_files(input_path, "--input"), cfg.data, 0, 1, table_rows(cfg))
    scores = []
    with torch.no_grad():
        for b in reader.batches():
            scores.append(torch.sigmoid(model(b.dense, b.sparse).squeeze(-1)))
    out = torch.cat(scores)
    pq.write_table(pa.table({"score": out.numpy()}), output_path)
    return out
