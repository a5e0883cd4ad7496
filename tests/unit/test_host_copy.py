"""The host copy of async saves: exact, independent of the source, buffers reused, every layout."""

from __future__ import annotations

import pytest
import torch

from reckpt.save.host_copy import stage_state_dict


@pytest.mark.parametrize("threads", [1, 2])
def test_copy_is_exact_and_independent(threads: int) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        big = torch.randn(20_000_000)  # 80 MB: more than one 64 MiB piece
        wide = torch.randn(64, 48)
        sd = {
            "big": big,
            "view": wide[:, 8:40],  # strided: not a raw block
            "t": wide.t(),
            "ints": torch.arange(10, dtype=torch.int64),
            "empty": torch.empty(0),
            "nested": {"a": [torch.ones(3), (torch.zeros(2), 5)], "lr": 0.1, "name": "x"},
        }
        want = {"big": big.clone(), "view": wide[:, 8:40].clone(), "t": wide.t().clone()}
        staged = stage_state_dict(sd)
        big.add_(1.0)
        wide.mul_(-1.0)
        sd["nested"]["a"][0].fill_(7.0)
        assert torch.equal(staged["big"], want["big"])
        assert torch.equal(staged["view"], want["view"]) and torch.equal(staged["t"], want["t"])
        assert torch.equal(staged["ints"], torch.arange(10)) and staged["empty"].numel() == 0
        assert torch.equal(staged["nested"]["a"][0], torch.ones(3))
        assert staged["nested"]["a"][1][1] == 5 and isinstance(staged["nested"]["a"][1], tuple)
        assert staged["nested"]["lr"] == 0.1 and staged["nested"]["name"] == "x"
    finally:
        torch.set_num_threads(before)


def test_buffers_are_reused_when_they_fit_and_replaced_when_not() -> None:
    sd = {"w": torch.randn(1000, 8), "b": torch.randn(8)}
    first = stage_state_dict(sd)
    sd["w"].add_(1.0)
    second = stage_state_dict({"w": sd["w"], "b": torch.randn(9)}, previous=first)
    assert second["w"] is first["w"] and torch.equal(second["w"], sd["w"])
    assert second["b"] is not first["b"] and second["b"].shape == (9,)


@pytest.mark.parametrize("lanes", [1, 2, 3, 8])
def test_spans_cover_every_byte_once_in_equal_shares(lanes: int) -> None:
    from reckpt.save.host_copy import _spans

    blocks = [(1000, 5000, 7), (2000, 6000, 1), (3000, 7000, 30)]
    out = _spans(blocks, lanes)
    sizes = [sum(n for _, _, n in lane) for lane in out]
    assert sum(sizes) == 38 and len(out) <= lanes and max(sizes) - min(sizes) <= 38 // lanes + 1
    covered = [(d + i, s + i) for lane in out for d, s, n in lane for i in range(n)]
    assert covered == [(d + i, s + i) for d, s, n in blocks for i in range(n)]


def test_tensors_whose_bytes_are_not_their_values_are_copied_by_value() -> None:
    z = torch.randn(4, dtype=torch.complex64)
    q = torch.quantize_per_tensor(torch.randn(6), scale=0.1, zero_point=3, dtype=torch.qint8)
    sd = {"conj": z.conj(), "neg": torch._neg_view(torch.randn(5)), "q": q}
    want = {
        k: (v.resolve_conj().resolve_neg() if not v.is_quantized else v.dequantize()) for k, v in sd.items()
    }
    staged = stage_state_dict(sd)
    again = stage_state_dict(sd, previous=staged)  # the reuse path too
    for got in (staged, again):
        assert torch.equal(got["conj"].resolve_conj(), want["conj"])
        assert torch.equal(got["neg"].resolve_neg(), want["neg"])
        assert got["q"].is_quantized and torch.equal(got["q"].dequantize(), want["q"])
        assert got["q"].q_scale() == 0.1 and got["q"].q_zero_point() == 3
