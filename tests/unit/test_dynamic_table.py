"""DynamicEmbedding in one process: creation, admission, eviction, Adagrad math, init, tracking."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reckpt.dynamic import DynamicEmbedding, dynamic_tables
from reckpt.dynamic.table import init_rows
from reckpt.errors import ConfigError


def bags(*groups: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([i for g in groups for i in g], dtype=torch.int64)
    offsets = torch.tensor([0, *torch.cumsum(torch.tensor([len(g) for g in groups]), 0).tolist()])
    return ids, offsets


def step(emb: DynamicEmbedding, *groups: list[int]) -> torch.Tensor:
    out: torch.Tensor = emb(*bags(*groups))
    torch.autograd.backward(out.pow(2).sum())
    return out.detach()


def keys(emb: DynamicEmbedding) -> list[int]:
    return sorted(emb.table.slot_of)


def test_rows_created_on_first_sight_from_the_key() -> None:
    emb = DynamicEmbedding(4, name="t", seed=3)
    assert len(emb.table) == 0
    out = emb(*bags([5, 2**40], [-7]))
    assert keys(emb) == [-7, 5, 2**40]
    expected = init_rows(torch.tensor([5, 2**40, -7]), 4, seed=3, bound=0.5)
    assert torch.equal(out[0], expected[0] + expected[1])
    assert torch.equal(out[1], expected[2])


def test_init_is_a_function_of_seed_and_key_only() -> None:
    a = init_rows(torch.tensor([1, 2, 3]), 8, seed=0, bound=1.0)
    b = init_rows(torch.tensor([3, 2, 1]), 8, seed=0, bound=1.0)
    assert torch.equal(a, b.flip(0))
    assert not torch.equal(a, init_rows(torch.tensor([1, 2, 3]), 8, seed=1, bound=1.0))
    assert a.abs().max() < 1.0 and a.std() > 0.3
    one, two = DynamicEmbedding(4, seed=9), DynamicEmbedding(4, seed=9)
    one(*bags([1], [2]))
    two(*bags([2], [1]))
    assert torch.equal(one.table.export().values, two.table.export().values)


def test_mean_pooling_and_jagged_tensor_input() -> None:
    from torchrec.sparse.jagged_tensor import JaggedTensor

    emb = DynamicEmbedding(4, mode="mean")
    ids, offsets = bags([1, 2], [3])
    out = emb(JaggedTensor(values=ids, offsets=offsets))
    rows = init_rows(torch.tensor([1, 2, 3]), 4, 0, 0.5)
    assert torch.allclose(out[0], (rows[0] + rows[1]) / 2) and torch.equal(out[1], rows[2])


def test_rowwise_adagrad_matches_a_reference_computation() -> None:
    emb = DynamicEmbedding(3, lr=0.1, eps=1e-8, seed=1)
    ids, offsets = bags([4, 4, 9], [9])
    w = init_rows(torch.tensor([4, 9]), 3, 1, 3**-0.5).double()
    state = torch.zeros(2, dtype=torch.float64)
    for _ in range(3):
        torch.autograd.backward(emb(ids, offsets).pow(2).sum())
        # Reference: pooled sums, d(loss)/d(row) summed over occurrences, row-wise Adagrad.
        ref = w.clone().requires_grad_(True)
        pooled = torch.stack([ref[0] * 2 + ref[1], ref[1]])
        torch.autograd.backward(pooled.pow(2).sum())
        g = ref.grad
        assert g is not None
        state += g.pow(2).mean(dim=1)
        w = w - (0.1 / (state.sqrt() + 1e-8)).unsqueeze(1) * g
    st = emb.table.export()
    assert torch.allclose(st.values.double(), w, atol=1e-6)
    assert torch.allclose(st.opt_values.double(), state, rtol=1e-5)


def test_eval_mode_reads_without_creating_or_training() -> None:
    emb = DynamicEmbedding(4)
    step(emb, [1])
    before = emb.table.export()
    emb.eval()
    out = emb(*bags([1], [2]))
    assert keys(emb) == [1] and torch.equal(out[1], torch.zeros(4))
    emb.train()
    with torch.no_grad():
        emb(*bags([3]))
    assert keys(emb) == [1] and torch.equal(emb.table.export().values, before.values)


def test_admission_by_frequency_threshold() -> None:
    emb = DynamicEmbedding(4, admit_threshold=3)
    out = step(emb, [7, 7], [8])
    assert keys(emb) == [] and torch.equal(out, torch.zeros(2, 4))  # not admitted: zero rows
    assert emb.table.counter == {7: 2, 8: 1}
    out = step(emb, [7], [8])
    assert keys(emb) == [7] and emb.table.counter == {8: 2}
    assert not torch.equal(out[0], torch.zeros(4)) and torch.equal(out[1], torch.zeros(4))
    # Admitted this step: created from its initial value, trained once (earlier zero reads never trained).
    init = init_rows(torch.tensor([7]), 4, 0, 0.5)[0]
    assert torch.equal(out[0], init)
    assert torch.allclose(emb.table.export().opt_values, (2 * init).pow(2).mean().reshape(1))


def test_lru_eviction_at_capacity() -> None:
    emb = DynamicEmbedding(2, capacity=3, eviction="lru")
    for k in (1, 2, 3):
        step(emb, [k])
    step(emb, [1])  # 2 is now the least recently used
    emb.clear_touched()
    step(emb, [4])
    assert keys(emb) == [1, 3, 4]
    assert emb.removed_keys().tolist() == [2] and emb.touched_keys().tolist() == [4]
    step(emb, [2, 5])  # two new rows: evicts 3 then 1 (oldest first), never this batch's keys
    assert keys(emb) == [2, 4, 5]
    assert emb.removed_keys().tolist() == [1, 3]


def test_lfu_eviction_at_capacity() -> None:
    emb = DynamicEmbedding(2, capacity=2, eviction="lfu")
    step(emb, [1, 1, 1])
    step(emb, [2])
    step(emb, [2])
    step(emb, [3])  # scores: 1 -> 3, 2 -> 2: 2 goes
    assert keys(emb) == [1, 3]
    assert emb.table.export().scores.tolist() == [3, 1]


def test_a_batch_larger_than_capacity_leaves_the_overflow_out() -> None:
    emb = DynamicEmbedding(2, capacity=2)
    out = step(emb, [1], [2], [3])
    assert len(emb.table) == 2 and torch.equal(out[2], torch.zeros(2))


def test_touched_keys_track_rows_optimizer_scores_and_counters() -> None:
    emb = DynamicEmbedding(2, admit_threshold=2)
    step(emb, [1, 1], [2])
    assert emb.touched_keys().tolist() == [1, 2]
    emb.clear_touched()
    assert emb.touched_keys().tolist() == [] and emb.removed_keys().tolist() == []
    step(emb, [2])
    assert emb.touched_keys().tolist() == [2]


def test_no_parameters_buffers_or_state_dict_entries() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 1)
            self.dyn = nn.ModuleDict({"user": DynamicEmbedding(2, name="u")})

    m = M()
    emb = m.dyn["user"]
    assert isinstance(emb, DynamicEmbedding)
    step(emb, [1])
    assert list(m.state_dict()) == ["lin.weight", "lin.bias"]
    assert [n for n, _ in m.named_parameters()] == ["lin.weight", "lin.bias"] and not list(m.buffers())
    assert list(dynamic_tables(m)) == [("model.dyn.user", "u")]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"embedding_dim": 0}, "embedding_dim must be >= 1"),
        ({"embedding_dim": 2, "capacity": 0}, "capacity must be >= 1"),
        ({"embedding_dim": 2, "eviction": "fifo"}, "eviction must be one of"),
        ({"embedding_dim": 2, "mode": "max"}, "mode must be 'sum' or 'mean'"),
    ],
)
def test_bad_settings_are_config_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DynamicEmbedding(**kwargs)  # type: ignore[arg-type]
