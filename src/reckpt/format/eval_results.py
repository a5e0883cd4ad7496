"""Eval results: TorchEasyRec's append-only JSON-lines files, and the metrics sidecar.

Each evaluation appends one line, ``{"global_step": <step>, <metric>: <float>, ...}`` with
metric names sorted (compat §1.5), to ``train_eval_result_v2.txt`` (during training) or
``eval_result.txt`` (standalone evaluation). The same metrics go into the checkpoint's
metrics sidecar, so best selection survives a lost or garbled results file; where both
know a step and disagree, the sidecar wins and the disagreement is reported.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from reckpt.format.manifest import read_sidecar, write_sidecar
from reckpt.storage.core import Storage

__all__ = [
    "TRAIN_EVAL_RESULT_FILENAME",
    "EVAL_RESULT_FILENAME",
    "EvalResults",
    "format_eval_line",
    "append_eval_result",
    "read_eval_results",
    "read_checkpoint_metrics",
    "write_checkpoint_metrics",
    "cross_check_eval_results",
]

logger = logging.getLogger(__name__)

TRAIN_EVAL_RESULT_FILENAME = "train_eval_result_v2.txt"
EVAL_RESULT_FILENAME = "eval_result.txt"
METRICS_SIDECAR = "metrics"


def format_eval_line(step: int | None, metrics: Mapping[str, float]) -> str:
    """One results line: ``global_step`` first, then metrics sorted by name, then ``\\n``."""
    doc: dict[str, Any] = {"global_step": step}
    for name in sorted(metrics):
        doc[name] = float(metrics[name])
    return json.dumps(doc) + "\n"


def append_eval_result(storage: Storage, path: str, step: int | None, metrics: Mapping[str, float]) -> None:
    """Append one line to a results file (rank 0 only).

    Object stores cannot append: the file is rewritten with the new line added.
    """
    line = format_eval_line(step, metrics).encode("utf-8")
    if storage.local:
        storage.makedirs(Storage.parent(path))
        with storage.open(path, "ab") as f:
            f.write(line)
        return
    old = storage.read_bytes(path) if storage.exists(path) else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    storage.write_bytes(path, old + line)


@dataclass(slots=True)
class EvalResults:
    """Parsed results file: step -> metrics (later lines win), plus the lines that failed."""

    by_step: dict[int, dict[str, float]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def read_eval_results(storage: Storage, path: str) -> EvalResults:
    """Parse a results file; garbled lines are reported (file and line) and skipped."""
    out = EvalResults()
    if not storage.isfile(path):
        return out
    for lineno, raw in enumerate(storage.read_text(path).splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            step = doc.pop("global_step")
            if step is None:
                continue  # a standalone eval of an explicit path: not tied to a step
            if isinstance(step, bool) or not isinstance(step, int):
                raise ValueError(f"global_step {step!r} is not an integer")
            metrics = {
                k: float(v) for k, v in doc.items() if isinstance(v, int | float) and not isinstance(v, bool)
            }
        except (ValueError, KeyError, TypeError) as e:
            msg = f"{path}:{lineno}: garbled eval result line skipped ({e}): {raw[:80]!r}"
            logger.warning("%s", msg)
            out.problems.append(msg)
            continue
        out.by_step[step] = metrics
    return out


def write_checkpoint_metrics(
    storage: Storage, checkpoint_dir: str, section: str, values: Mapping[str, Any]
) -> None:
    """Merge ``values`` into one section (``eval``, ``save``) of the checkpoint's metrics sidecar."""
    payload = read_sidecar(storage, checkpoint_dir, METRICS_SIDECAR) or {}
    merged = dict(payload.get(section) or {})
    merged.update(values)
    payload[section] = merged
    write_sidecar(storage, checkpoint_dir, METRICS_SIDECAR, payload)


def read_checkpoint_metrics(storage: Storage, checkpoint_dir: str) -> dict[str, float]:
    """The eval metrics recorded in a checkpoint's sidecar (``{}`` when none)."""
    payload = read_sidecar(storage, checkpoint_dir, METRICS_SIDECAR) or {}
    ev = payload.get("eval") or {}
    return {k: float(v) for k, v in ev.items() if isinstance(v, int | float) and math.isfinite(float(v))}


def cross_check_eval_results(
    storage: Storage, model_dir: str, filename: str = TRAIN_EVAL_RESULT_FILENAME
) -> list[str]:
    """Problems of a results file, found by checking it against the checkpoints' metrics sidecars.

    The results file is appended to, so it carries no checksum; each committed checkpoint's
    metrics sidecar (checksummed) holds the same numbers. Reported: garbled lines (file and
    line), steps a sidecar records but the file lacks (a truncated file), and values that
    differ (a flipped digit). Sidecars that are themselves damaged are reported too.

    Example:
        >>> # for p in cross_check_eval_results(storage_for("run"), "run"): print(p)
    """
    from reckpt.commit.state import checkpoint_state
    from reckpt.errors import IntegrityError
    from reckpt.naming import parse_any_step

    path = Storage.join(model_dir, filename)
    parsed = read_eval_results(storage, path)
    problems = list(parsed.problems)
    for name in storage.ls(model_dir):
        step = parse_any_step(name)
        ckpt = Storage.join(model_dir, name)
        if step is None or checkpoint_state(storage, ckpt) != "committed":
            continue
        try:
            side = read_checkpoint_metrics(storage, ckpt)
        except IntegrityError as e:
            problems.append(str(e))
            continue
        if not side:
            continue
        line = parsed.by_step.get(step)
        if line is None:
            problems.append(
                f"{path}: no result for step {step}, but {name}'s metrics sidecar records {side}"
                " (lines lost or truncated)"
            )
        elif any(line.get(k) != v for k, v in side.items()):
            problems.append(
                f"{path}: step {step} says {line}, but {name}'s metrics sidecar says {side} (altered)"
            )
    return problems
