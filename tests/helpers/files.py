"""Damaging and writing files the way tests need: flipped bits, random contents, TorchEasyRec's
eval results."""

from __future__ import annotations

import json
from collections.abc import Mapping
from os import PathLike
from pathlib import Path

import numpy as np


def random_bytes(n: int, seed: int = 0) -> bytes:
    """``n`` reproducible pseudo-random bytes."""
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


def flip_byte(path: str | PathLike[str], at: int | None = None, mask: int = 0x01) -> None:
    """XOR one byte of a file with ``mask`` (default: the middle byte's lowest bit); ``at < 0``
    counts from the end. The file keeps its size."""
    f = Path(path)
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2 if at is None else at] ^= mask
    f.write_bytes(bytes(raw))


def flip_bit(checkpoint_dir: str | PathLike[str], at: int | None = None, part: str = "model") -> None:
    """Flip one bit of a checkpoint's first data file (default: in its middle)."""
    flip_byte(Path(checkpoint_dir) / part / "__0_0.distcp", at)


def write_eval_results(model_dir: str | PathLike[str], rows: Mapping[int, Mapping[str, float]]) -> None:
    """Write TorchEasyRec's ``train_eval_result_v2.txt`` in ``model_dir``: one JSON line a step."""
    lines = [json.dumps({"global_step": step, **metrics}) for step, metrics in rows.items()]
    (Path(model_dir) / "train_eval_result_v2.txt").write_text("\n".join(lines) + "\n")
