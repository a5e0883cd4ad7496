"""Lossy row encodings for delta dumps and exports: row-wise int8 and fp16 (pure, no I/O).

Row-wise int8 is TorchEasyRec's ``QUint8RowwiseF16`` (compat §10.4): per row
``offset = fp16(min)``, ``scale = fp16((max - offset) / 255)`` (1.0 when the range is 0 or
rounds to 0), ``q = clip(rint((x - offset) / scale), 0, 255)``; a packed row is the ``dim``
uint8 codes followed by the fp16 scale and the fp16 offset (``dim + 4`` bytes). Decoding is
``q * scale + offset``. The error of a value is at most ``scale / 2`` plus what the fp16
rounding of scale and offset adds (``|offset - min|`` and ``255 * |scale - exact scale|``).

fp16 keeps a relative error of at most ``2**-11`` for values in fp16's normal range.
Resume checkpoints never use these encodings unless asked to.
"""

from __future__ import annotations

import torch

from reckpt.errors import ConfigError

__all__ = [
    "ENCODINGS",
    "decode_rows",
    "dequantize_rowwise_int8",
    "encode_rows",
    "encoded_row_bytes",
    "quantize_rowwise_int8",
]

ENCODINGS = ("raw", "int8", "fp16")
_FP16_MAX = float(torch.finfo(torch.float16).max)


def _check_finite(rows: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(rows).all()):
        raise ValueError(
            f"{what}: rows hold NaN or infinite values; they cannot be quantized (use encoding 'raw')"
        )


def quantize_rowwise_int8(
    rows: torch.Tensor, what: str = "rows"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a 2-D float tensor row-wise: ``(codes uint8 [n, d], scale fp16 [n], offset fp16 [n])``.

    Raises:
        ValueError: non-finite values, or a scale or offset beyond fp16's range (``what``
            names the tensor in the message).
    """
    x = rows.detach().to(torch.float32).reshape(rows.shape[0], -1)
    _check_finite(x, what)
    if x.shape[0] == 0:
        empty = torch.empty(0, dtype=torch.float16)
        return torch.empty(x.shape, dtype=torch.uint8), empty, empty
    lo = x.min(dim=1).values
    hi = x.max(dim=1).values
    if float(lo.abs().max()) > _FP16_MAX or float((hi - lo).max()) / 255 > _FP16_MAX:
        raise ValueError(f"{what}: values exceed fp16's range for the int8 scale/offset; use encoding 'raw'")
    offset = lo.to(torch.float16)
    scale = ((hi - offset.float()) / 255).to(torch.float16)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.clamp(torch.round((x - offset.float()[:, None]) / scale.float()[:, None]), 0, 255)
    return codes.to(torch.uint8), scale, offset


def dequantize_rowwise_int8(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_rowwise_int8` (float32)."""
    return codes.float() * scale.float()[:, None] + offset.float()[:, None]


def encoded_row_bytes(encoding: str, row_elems: int, itemsize: int) -> int:
    """Bytes one row takes in ``encoding``."""
    if encoding == "int8":
        return row_elems + 4
    if encoding == "fp16":
        return 2 * row_elems
    if encoding == "raw":
        return itemsize * row_elems
    raise ConfigError(f"row encoding must be one of {ENCODINGS}, got {encoding!r}")


def encode_rows(rows: torch.Tensor, encoding: str, what: str = "rows") -> bytes:
    """Rows (2-D, or 1-D as one value per row) as bytes in ``encoding``.

    ``int8`` packs each row as codes + fp16 scale + fp16 offset; ``fp16`` casts; ``raw``
    keeps the dtype (lossless).
    """
    if encoding == "raw":  # the bits as they are (through uint8: numpy has no bfloat16)
        return rows.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    flat = rows.detach().reshape(rows.shape[0], -1)
    if encoding == "fp16":
        x = flat.to(torch.float32)
        _check_finite(x, what)
        if x.numel() and float(x.abs().max()) > _FP16_MAX:
            raise ValueError(f"{what}: values exceed fp16's range; use encoding 'raw'")
        return x.to(torch.float16).contiguous().numpy().tobytes()
    if encoding == "int8":
        codes, scale, offset = quantize_rowwise_int8(flat, what)
        tail = torch.stack([scale, offset], dim=1).view(torch.uint8)
        return torch.cat([codes, tail], dim=1).contiguous().numpy().tobytes()
    raise ConfigError(f"row encoding must be one of {ENCODINGS}, got {encoding!r}")


def decode_rows(
    data: bytes | memoryview, encoding: str, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of :func:`encode_rows`: a tensor of ``shape`` and ``dtype``.

    Raises:
        ValueError: ``data`` does not hold exactly ``shape``'s rows in ``encoding``.
    """
    n = shape[0] if shape else 1
    row_elems = 1
    for s in shape[1:]:
        row_elems *= s
    want = n * encoded_row_bytes(encoding, row_elems, torch.empty(0, dtype=dtype).element_size())
    if len(data) != want:
        raise ValueError(
            f"{len(data)} bytes do not hold {n} rows of {row_elems} values in encoding {encoding!r}"
        )
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if want else torch.empty(0, dtype=torch.uint8)
    if encoding == "raw":
        return buf.view(dtype).reshape(shape)
    if encoding == "fp16":
        return buf.view(torch.float16).to(dtype).reshape(shape)
    packed = buf.reshape(n, row_elems + 4)
    tail = packed[:, row_elems:].contiguous().view(torch.float16)
    return dequantize_rowwise_int8(packed[:, :row_elems], tail[:, 0], tail[:, 1]).to(dtype).reshape(shape)
