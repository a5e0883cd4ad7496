"""Gloo scenarios of the trainer's pipelined steps (:mod:`reckpt.trainer.pipeline`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

import reckpt
from reckpt.restore.inspection import read_part
from reckpt.trainer.config import Config, DataConfig
from reckpt.trainer.data import Batch, ParquetReader, input_files
from reckpt.trainer.model import build_model, shard_model, table_rows
from reckpt.trainer.pipeline import PipelinedSteps, PlainSteps, Steps
from tests.distributed.elastic_scenarios import flat_optimizer_state
from tests.helpers.sharded import gather_all


def small_config(data_dir: str, batch_size: int = 50) -> Config:
    """Bags, a multi-valued bag and a sequence feature, on the demo data under ``data_dir``."""
    cfg = Config()
    cfg.data = DataConfig(
        train_input_path=f"{data_dir}/train",
        eval_input_path=f"{data_dir}/eval",
        dense_columns=["d0", "d1", "d2", "d3"],
        sparse_columns=["s0", "s1", "s2"],
        sequence_columns=["h0"],
        batch_size=batch_size,
    )
    cfg.model.embedding_dim, cfg.model.num_embeddings = 8, 500
    cfg.model.bottom_mlp, cfg.model.top_mlp = [16, 8], [16, 1]
    cfg.train_config.num_epochs = 2
    return cfg.validate("<test>")


class Counting:
    """The reader's batches, counting how many the steps pulled."""

    def __init__(self, batches: Iterator[Batch]) -> None:
        self.batches, self.pulled = batches, 0

    def __iter__(self) -> Iterator[Batch]:
        for b in self.batches:
            self.pulled += 1
            yield b


def train(cfg: Config, steps_cls: type[Steps], rank: int, world: int) -> dict[str, Any]:
    """Two passes; an eval (the model paused out of the pipeline) after step 3 of each pass and
    at each pass end. Returns per step what was trained and pulled, and the final state."""
    torch.manual_seed(0)
    model, optimizer = shard_model(cfg, build_model(cfg))
    reader = ParquetReader(
        input_files(cfg.data.train_input_path, "train"), cfg.data, rank, world, table_rows(cfg), row_ids=True
    )
    evals = ParquetReader(
        input_files(cfg.data.eval_input_path, "eval"), cfg.data, rank, world, table_rows(cfg)
    )
    steps = steps_cls(model, optimizer)

    def evaluate() -> float:
        model.eval()
        with steps.paused(), torch.no_grad():
            total = sum(float(model(b.dense, b.sparse).sum()) for b in evals.batches())
        model.train()
        return total

    log: list[tuple[list[int], bool, int]] = []  # (row ids, padding, pulled when the step returned)
    scores, losses = [], []
    for _ in range(2):
        source = Counting(reader.batches())
        for i, (batch, loss) in enumerate(steps.run(source)):
            assert batch.row_ids is not None
            log.append((batch.row_ids.tolist(), batch.padding, source.pulled))
            losses.append(float(loss))
            if i == 3:
                scores.append(evaluate())
        scores.append(evaluate())
    state = gather_all(dict(model.state_dict())) | {
        f"opt/{k}": v for k, v in gather_all(flat_optimizer_state(optimizer)).items()
    }
    return {"log": log, "scores": scores, "losses": losses, "state": state, "total": len(log) // 2}


def pipelined_equals_plain(rank: int, world: int, data_dir: str) -> None:
    """The pipeline trains the batches the plain loop trains, in the same order, to the same
    weights and optimizer state (bitwise), with evals between steps; a step hands back the
    batch it trained while the pipeline has pulled up to two more; stand-in batches (a rank
    whose data ended first) go through it like the others."""
    cfg = small_config(data_dir)
    plain = train(cfg, PlainSteps, rank, world)
    piped = train(cfg, PipelinedSteps, rank, world)
    assert [x[:2] for x in piped["log"]] == [x[:2] for x in plain["log"]], f"rank {rank}: other batches"
    assert piped["losses"] == plain["losses"] and piped["scores"] == plain["scores"]
    differ = sorted(k for k in plain["state"] if not torch.equal(plain["state"][k], piped["state"][k]))
    assert not differ, f"rank {rank}: differ after training: {differ}"
    n = piped["total"]
    for p in range(2):  # per pass: step i returns after batches 0..min(i+2, n-1) were pulled
        pulled = [x[2] for x in piped["log"][p * n : (p + 1) * n]]
        assert pulled == [min(i + 3, n) for i in range(n)], f"rank {rank}: pulled {pulled}"
        assert [x[2] for x in plain["log"][p * n : (p + 1) * n]] == list(range(1, n + 1))
    if world > 1:  # the data does not divide evenly: some rank ends each pass on stand-ins
        padded = torch.tensor([sum(x[1] for x in piped["log"])])
        torch.distributed.all_reduce(padded)
        assert int(padded) > 0, "the scenario's data was to leave a rank with stand-in steps"


def chain_matches_full(rank: int, world: int, config: str, delta: str, full: str) -> None:
    """A delta checkpoint's chain, restored into the trainer's sharded model and optimizer, holds
    exactly the tensors of the full checkpoint of the same step (written by another run)."""
    from reckpt.trainer.config import load_config

    cfg = load_config(config)
    torch.manual_seed(1234 + rank)
    model, optimizer = shard_model(cfg, build_model(cfg))
    reckpt.restore_model(delta, model, optimizer, strict_shapes=True)
    for part, live in (("model", dict(model.state_dict())), ("optimizer", flat_optimizer_state(optimizer))):
        saved = {k: v for k, v in read_part(full, part).items() if isinstance(v, torch.Tensor)}
        got = gather_all(live)
        assert set(saved) <= set(got), f"{part}: not restored: {sorted(set(saved) - set(got))}"
        differ = sorted(k for k in saved if not torch.equal(saved[k], got[k]))
        assert not differ, f"rank {rank}: {part} of {delta} differs from {full}: {differ}"
