"""What a person follows while the trainer runs: progress, save and restore lines, the JSON-lines log.

Rank 0 prints the progress (a tqdm bar on a terminal, else a line every
``log_step_count_steps`` steps with loss, examples/s and an ETA), one line per save and per
restore (size, time, GB/s, tier), and writes ``train_log.jsonl`` in the model_dir:

* ``{"step": s, "loss": l, "examples_per_s": r}`` every ``log_step_count_steps`` steps;
* ``{"step": s, "event": "save", "path", "kind", "bytes", "stall_s", "seconds", "gbps",
  "tier", "async"}`` per committed save;
* ``{"step": s, "event": "restore", "path", "bytes", "seconds", "gbps", "tier"}`` per restore;
* ``{"step": s, "event": "eval", <metric>: value ...}`` per evaluation.

``reckpt plot`` draws it (loss, save sizes, save stalls next to the eval metric).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

import reckpt
from reckpt.format.manifest import chain_names, read_manifest
from reckpt.lifecycle.background import SaveRecord
from reckpt.storage.core import Storage, storage_for

__all__ = [
    "TRAIN_LOG",
    "TrainLog",
    "Progress",
    "checkpoint_bytes",
    "save_line",
    "restore_line",
    "summary_table",
    "summary_writer",
    "row_log",
]

logger = logging.getLogger(__name__)

TRAIN_LOG = "train_log.jsonl"
"""The JSON-lines training log in the model_dir (rank 0)."""


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KB"`` (powers of 1000, as GB/s is)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover - the loop returns at GB


def save_line(record: SaveRecord) -> str:
    """One line for a committed save: path, kind, size, time, GB/s, stall, tier."""
    kind = "delta" if ".delta-" in record.path.rsplit("/", 1)[-1] else "full"
    how = f"async, training blocked {record.stall_s:.3f} s" if record.is_async else "sync"
    return (
        f"save {record.path} ({kind}): {human_bytes(record.bytes)} in {record.seconds:.3f} s,"
        f" {record.gbps:.3g} GB/s ({how}), tier {record.tier}"
    )


def restore_line(path: str, nbytes: int, seconds: float, tier: str, links: int) -> str:
    """One line for a restore: path, size (of the whole delta chain), time, GB/s, tier."""
    chain = f", a chain of {links} checkpoints" if links > 1 else ""
    return (
        f"restore {path}: {human_bytes(nbytes)}{chain} in {seconds:.3f} s,"
        f" {nbytes / 1e9 / max(seconds, 1e-9):.3g} GB/s, tier {tier}"
    )


def checkpoint_bytes(path: str) -> tuple[int, int]:
    """``(bytes, links)``: the bytes a restore of ``path`` reads (a delta: its whole chain) per the
    manifests, and how many checkpoints that is. ``(0, 1)`` when no manifest says."""
    storage = storage_for(path)
    try:
        manifest = read_manifest(storage, path, check=False)
        names = chain_names(manifest, path)
        parent = Storage.parent(path.rstrip("/"))
        total = 0
        for name in names:
            m = (
                manifest
                if name == names[-1]
                else read_manifest(storage, Storage.join(parent, name), check=False)
            )
            total += 0 if m is None else sum(f.size for f in m.files.values())
    except Exception as e:  # a statistic: never a reason to fail a restore that worked
        logger.warning("%s: cannot read the manifests for the restore's size: %s", path, e)
        return 0, 1
    return total, len(names)


class TrainLog:
    """Rank 0's ``train_log.jsonl`` in the model_dir, written through reckpt's storage layer.

    A local model_dir gets each line appended at once (line-buffered: a killed run keeps
    them); an object store cannot append, so the lines are kept and the file is rewritten
    with them at :meth:`flush` (each save, and the end). A resumed run appends to the log of
    the run it resumes. Other ranks get a log that writes nothing.
    """

    def __init__(self, model_dir: str, enabled: bool) -> None:
        self.enabled = enabled
        self.path = Storage.join(model_dir.rstrip("/"), TRAIN_LOG)
        self.storage = storage_for(model_dir)
        self._file: Any = None
        self._pending: list[bytes] = []
        self._old = b""
        if not enabled:
            return
        if self.storage.local:
            self.storage.makedirs(model_dir)
            self._file = self.storage.open(self.path, "ab")
        elif self.storage.exists(self.path):
            self._old = self.storage.read_bytes(self.path)

    def write(self, step: int, **fields: Any) -> None:
        """Append ``{"step": step, **fields}`` (floats as JSON numbers; NaN as ``null``)."""
        if not self.enabled:
            return
        doc = {"step": step, **{k: _json_value(v) for k, v in fields.items()}}
        line = (json.dumps(doc) + "\n").encode()
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
        else:
            self._pending.append(line)

    def flush(self) -> None:
        """Remote model_dirs: rewrite the file with every line so far (local ones are current)."""
        if self.enabled and self._file is None and self._pending:
            self._old += b"".join(self._pending)
            self._pending = []
            self.storage.write_bytes(self.path, self._old)

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and v != v:
        return None
    return v


def _duration(seconds: float) -> str:
    """``3725`` -> ``"1h02m"``, ``125`` -> ``"2m05s"``, ``7`` -> ``"7s"``."""
    m, sec = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


class Progress:
    """Rank 0's progress (step, loss, examples/s): a tqdm bar on a terminal, else a line every
    ``log_every`` steps with an ETA."""

    def __init__(self, rank: int, total: int | None, initial: int, log_every: int) -> None:
        self.bar = None
        self.rank, self.log_every = rank, max(log_every, 1)
        self.total, self.initial, self.started = total, initial, time.time()
        if rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self.last = initial

    def update(self, step: int, loss: float, eps: float) -> None:
        if self.bar is not None:
            self.bar.update(step + 1 - self.last)
            self.bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{eps:,.0f}")
        elif self.rank == 0 and step % self.log_every == 0:
            eta = ""
            if self.total and step + 1 > self.initial:
                rate = (step + 1 - self.initial) / max(time.time() - self.started, 1e-9)
                eta = f" eta {_duration((self.total - step - 1) / rate)}"
            print(f"step {step} loss {loss:.4f} examples/s {eps:,.0f}{eta}", file=sys.stderr, flush=True)
        self.last = step + 1

    def note(self, line: str) -> None:
        """A line of its own (a save, an eval, a restore), shown without -v."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        elif self.rank == 0:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def summary_table(
    checkpoints: list[reckpt.CheckpointInfo], latest: str | None, best: str | None, loss: float
) -> str:
    """The end-of-run table: the final loss, then one row per checkpoint (state, metrics, marks)."""
    head = (
        f"final train loss {loss:.4f}"
        if loss == loss
        else "final train loss n/a (no step trained by this run)"
    )
    lines = [head, f"{'step':>8}  {'state':<10} {'auc':>8} {'logloss':>8}  marks"]
    for c in checkpoints:
        marks = " ".join(m for m, p in (("latest", latest), ("best", best)) if p == c.path)
        a, ll = c.metrics.get("auc", float("nan")), c.metrics.get("logloss", float("nan"))
        lines.append(f"{c.step:>8}  {c.state:<10} {a:>8.4f} {ll:>8.4f}  {marks}")
    return "\n".join(lines)


def summary_writer(model_dir: str) -> Any:
    """TensorBoard events in model_dir (local model_dirs; a URL model_dir gets none, with a warning)."""
    if "://" in model_dir and not model_dir.startswith("file://"):
        logger.warning("model_dir %s is remote: TensorBoard summaries are not written", model_dir)
        return None
    from torch.utils.tensorboard import SummaryWriter

    local = model_dir.removeprefix("file://")
    os.makedirs(local, exist_ok=True)
    return SummaryWriter(log_dir=local)


def eval_fields(metrics: Mapping[str, float]) -> dict[str, float]:
    """An eval's metrics as train-log fields (sorted by name)."""
    return {k: float(metrics[k]) for k in sorted(metrics)}


@contextlib.contextmanager
def row_log(folder: str, rank: int) -> Iterator[TextIO | None]:
    """The trained-rows audit file of this rank (line-buffered: a killed run keeps its lines), or None."""
    if not folder:
        yield None
        return
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"rows-rank{rank}-pid{os.getpid()}.txt"), "a", buffering=1) as f:
        yield f
