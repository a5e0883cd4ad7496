"""The training steps: TorchRec's ``TrainPipelineSparseDist``, or the plain loop.

Both run the same computation per batch (zero the gradients, the model's loss, backward, the
optimizer step) and yield, after each step, the batch that step trained. The pipeline pulls
batches ahead of the one it trains (batches ``i+1`` and ``i+2`` are read while ``i`` trains,
and ``i+1``'s embedding input exchange runs before ``i``'s forward), so it keeps the batches it
has pulled in a first-in first-out queue and hands back the oldest after each step: the data
position a checkpoint records is that of the last *trained* batch, and a resume reads the
pulled-but-untrained batches again. See ``docs/pipeline.md``.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torchrec.streamable import Pipelineable

from reckpt.trainer.data import Batch

__all__ = ["TrainBatch", "Steps", "PlainSteps", "PipelinedSteps", "make_steps"]


@dataclass(slots=True)
class TrainBatch(Pipelineable):  # type: ignore[misc]  # torchrec is untyped here
    """What the model trains on: features, labels and a per-row loss weight (0 for a stand-in)."""

    dense: torch.Tensor
    sparse: Any
    label: torch.Tensor
    weight: torch.Tensor

    @classmethod
    def of(cls, batch: Batch) -> TrainBatch:
        rows = int(batch.label.shape[0])
        weight = torch.zeros(rows) if batch.padding else torch.ones(rows)
        return cls(batch.dense, batch.sparse, batch.label, weight)

    def to(self, device: torch.device, non_blocking: bool = False) -> TrainBatch:
        return TrainBatch(
            self.dense.to(device, non_blocking=non_blocking),
            self.sparse.to(device, non_blocking=non_blocking),
            self.label.to(device, non_blocking=non_blocking),
            self.weight.to(device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: Any) -> None:
        for t in (self.dense, self.label, self.weight):
            t.record_stream(stream)
        self.sparse.record_stream(stream)


class Steps:
    """Runs training steps over an iterable of batches; :meth:`run` yields ``(batch, loss)`` per step.

    ``loss`` is the step's loss, detached (a 0-dim tensor). Stop iterating at any time: the
    batches pulled ahead of the last trained one are not trained (nor counted in a position).
    """

    pipelined = False

    def run(self, batches: Iterable[Batch]) -> Iterator[tuple[Batch, torch.Tensor]]:
        raise NotImplementedError

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Use the model outside training (an eval) between two steps."""
        yield


class PlainSteps(Steps):
    """One batch at a time: read, forward, backward, step."""

    def __init__(self, model: torch.nn.Module, optimizer: Any) -> None:
        self.model, self.optimizer = model, optimizer

    def run(self, batches: Iterable[Batch]) -> Iterator[tuple[Batch, torch.Tensor]]:
        for batch in batches:
            self.optimizer.zero_grad()
            loss, out = self.model(TrainBatch.of(batch))
            torch.autograd.backward(loss)
            self.optimizer.step()
            yield batch, out


class PipelinedSteps(Steps):
    """TorchRec's ``TrainPipelineSparseDist`` on CPU, with the pulled batches in a FIFO.

    One pipeline serves the whole run; each data pass gives it a new iterator and is drained
    to its last batch (``execute_all_batches``), so a pass ends on the same step as in the
    plain loop. :meth:`paused` detaches the pipeline from the model (the sharded modules get
    their own forward back) for an eval; the next step re-attaches it.
    """

    pipelined = True

    def __init__(self, model: torch.nn.Module, optimizer: Any) -> None:
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

        # torchrec's tracer asks torch.fx whether it is tracing, which warns once per trace that
        # the question is ambiguous; nothing for a person running the trainer to act on.
        logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
        self.pipeline: Any = TrainPipelineSparseDist(
            model, optimizer, torch.device("cpu"), execute_all_batches=True
        )
        self.pulled: deque[Batch] = deque()

    def run(self, batches: Iterable[Batch]) -> Iterator[tuple[Batch, torch.Tensor]]:
        self.pulled.clear()  # a previous pass that was left early: its pulled batches are dropped
        self.pipeline.reset()

        def feed() -> Iterator[TrainBatch]:
            for batch in batches:
                self.pulled.append(batch)
                yield TrainBatch.of(batch)

        source = feed()
        while True:
            try:
                out = self.pipeline.progress(source)
            except StopIteration:
                return
            yield self.pulled.popleft(), out

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Give the sharded modules their own forward back for an eval, then the pipelined one.

        TorchRec's ``attach()`` would redo the pending batch's input exchange into a fresh
        module context that nothing waits for, and a sharded ``EmbeddingCollection`` then
        sends its output with the sizes of nothing (gloo: ``in->size == out->size``). So
        with batches in flight the pipelined forwards are kept and put back as they were,
        with the pending exchange and its context untouched.
        """
        from torchrec.distributed.train_pipeline.utils import _override_input_dist_forwards

        pipe = self.pipeline
        modules = list(pipe._pipelined_modules)
        if not modules or not pipe.contexts:  # nothing in flight: the next step re-pipelines
            pipe.detach()
            yield
            return
        forwards = [m.forward for m in modules]
        pipe.detach()
        try:
            yield
        finally:
            for module, forward in zip(modules, forwards, strict=True):
                module.forward = forward
            pipe._original_kjt_dist_forwards = _override_input_dist_forwards(modules)
            pipe._model_attached = True


def make_steps(model: torch.nn.Module, optimizer: Any, pipeline: bool) -> Steps:
    """The pipelined steps when ``pipeline`` (and the model has sharded modules to pipeline), else plain."""
    return PipelinedSteps(model, optimizer) if pipeline else PlainSteps(model, optimizer)
