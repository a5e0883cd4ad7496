"""Runs of the reference trainer's CLI for the trainer tests: the launcher and a small config."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.helpers.paths import REPO
from tests.helpers.processes import free_port, run_python

__all__ = ["EVERY", "STEPS", "cli", "write_config"]

STEPS, EVERY = 60, 20
"""Steps of :func:`write_config`'s runs and their checkpoint interval (checkpoints at 20, 40, 59)."""


def cli(
    *args: str, world: int = 1, env: dict[str, str] | None = None, cwd: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m reckpt.cli ARGS`` on ``world`` processes (torchrun on 127.0.0.1 when above 1)."""
    launch = []
    if world > 1:
        launch = [
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={world}",
            "--nnodes=1",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
        ]
    env = {"OMP_NUM_THREADS": "1", **(env or {})}
    return run_python(*launch, "-m", "reckpt.cli", *args, env=env, cwd=cwd or REPO, timeout=600)


def write_config(
    path: Path,
    data: Path,
    model_dir: Path,
    sparse: tuple[str, ...] = ("s0", "s1", "s2"),
    sequence: tuple[str, ...] = ("h0",),
    every: int | None = EVERY,
    **extra: str,
) -> str:
    """A config of 60 steps (checkpoints at 20, 40, 59): bags, and a sequence feature (``h0``, an
    ``EmbeddingCollection`` table) unless ``sequence`` is empty; ``extra`` adds lines to
    ``[model]`` (``model=``) and ``[train_config]`` (``train=``); ``every=None`` leaves
    ``save_checkpoints_steps`` out (checkpoint tiers set the cadence)."""
    sparse_list = ", ".join(f'"{s}"' for s in sparse)
    sequence_list = ", ".join(f'"{s}"' for s in sequence)
    text = f"""
model_dir = "{model_dir}"
[data]
train_input_path = "{data}/train"
eval_input_path = "{data}/eval"
dense_columns = ["d0", "d1", "d2", "d3"]
sparse_columns = [{sparse_list}]
sequence_columns = [{sequence_list}]
batch_size = 128
[model]
embedding_dim = 8
num_embeddings = 500
bottom_mlp = [16, 8]
top_mlp = [16, 1]
{extra.get("model", "")}
[train_config]
num_steps = {STEPS}
{"" if every is None else f"save_checkpoints_steps = {every}"}
learning_rate = 0.003
{extra.get("train", "")}
[export_config]
exporter_type = "best"
"""
    path.write_text(text)
    return str(path)
