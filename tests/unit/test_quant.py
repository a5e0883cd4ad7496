"""Row encodings: the int8 and fp16 error bounds, the packed layout, and refusals."""

from __future__ import annotations

import pytest
import torch

from reckpt.delta.quant import decode_rows, encode_rows, quantize_rowwise_int8


def _rows(seed: int, n: int = 257, d: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-3, 2, n)[:, None]
    return (torch.randn(n, d, generator=g) * scale + torch.randn(n, 1, generator=g)).float()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_int8_error_within_half_a_step_plus_fp16_rounding(seed: int) -> None:
    x = _rows(seed)
    codes, scale, offset = quantize_rowwise_int8(x)
    back = decode_rows(encode_rows(x, "int8"), "int8", tuple(x.shape), torch.float32)
    lo, hi = x.min(dim=1).values, x.max(dim=1).values
    exact_scale = (hi - offset.float()) / 255
    bound = scale.float() / 2 + (offset.float() - lo).abs() + 255 * (scale.float() - exact_scale).abs()
    err = (back - x).abs().max(dim=1).values
    assert bool((err <= bound * (1 + 1e-6) + 1e-12).all()), float((err - bound).max())
    assert codes.dtype == torch.uint8 and scale.dtype == torch.float16


def test_int8_packed_row_is_codes_then_scale_then_offset() -> None:
    x = torch.tensor([[0.0, 1.0, 2.0, 255.0]])
    raw = encode_rows(x, "int8")
    assert len(raw) == 4 + 4
    assert list(raw[:4]) == [0, 1, 2, 255]
    tail = torch.frombuffer(bytearray(raw[4:]), dtype=torch.float16)
    assert tail.tolist() == [1.0, 0.0]


def test_constant_row_uses_scale_one() -> None:
    x = torch.full((2, 8), 3.0)
    _, scale, offset = quantize_rowwise_int8(x)
    assert scale.tolist() == [1.0, 1.0] and offset.tolist() == [3.0, 3.0]
    assert torch.equal(decode_rows(encode_rows(x, "int8"), "int8", (2, 8), torch.float32), x)


def test_fp16_relative_error_bound() -> None:
    x = _rows(5) + 1e-2 * torch.sign(_rows(5))  # away from fp16's subnormal range
    back = decode_rows(encode_rows(x, "fp16"), "fp16", tuple(x.shape), torch.float32)
    rel = ((back - x).abs() / x.abs()).max()
    assert float(rel) <= 2**-11


def test_raw_is_lossless_for_any_dtype() -> None:
    for t in (torch.randn(5, 3), torch.arange(7, dtype=torch.int64), torch.randn(4, 2).double()):
        back = decode_rows(encode_rows(t, "raw"), "raw", tuple(t.shape), t.dtype)
        assert torch.equal(back, t)


def test_refusals_name_the_tensor() -> None:
    with pytest.raises(ValueError, match="t1: rows hold NaN"):
        encode_rows(torch.tensor([[float("nan"), 1.0]]), "int8", "t1")
    with pytest.raises(ValueError, match="t2: values exceed fp16"):
        encode_rows(torch.tensor([[1e6, 1.0]]), "fp16", "t2")
    with pytest.raises(ValueError, match="do not hold 3 rows"):
        decode_rows(b"\0" * 5, "raw", (3, 1), torch.float32)
    with pytest.raises(ValueError, match="encoding must be one of"):
        encode_rows(torch.zeros(1, 1), "int4")
