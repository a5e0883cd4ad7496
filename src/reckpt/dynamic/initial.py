"""Initial rows of a dynamic table: a pure function of (seed, key, column).

Each value is ``uniform[-bound, bound)`` from 24 bits of SplitMix64 of the key, the seed and
the column, so a row's first value never depends on when, where or in which order its key
arrived. :func:`write_init` writes rows in place with the C kernel (bitwise the NumPy
formula below, which is the reference and the fallback).
"""

from __future__ import annotations

import numpy as np
import torch

from reckpt.dynamic.index import kernels, mix64

__all__ = ["init_rows", "write_init"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _seed_mix(seed: int) -> np.uint64:
    out: np.uint64 = mix64(np.array([seed], dtype=np.int64).view(np.uint64))[0]
    return out


def write_init(
    keys: np.ndarray,
    slots: np.ndarray | None,
    dim: int,
    seed: int,
    bound: float,
    out: np.ndarray,
    *,
    use_kernels: bool = True,
) -> None:
    """Initial rows of ``keys`` into ``out[slots]`` (``out[:len(keys)]`` when ``slots`` is None).

    ``use_kernels=False`` takes the NumPy formula even where the C kernel is loaded.
    """
    if not len(keys):
        return
    keys = np.ascontiguousarray(keys, dtype=np.int64)
    k = kernels() if use_kernels else None
    if k is not None:
        sl = None if slots is None else np.ascontiguousarray(slots, dtype=np.int64)
        assert out.dtype == np.float32 and out.flags.c_contiguous and out.shape[1:] == (dim,)
        ptr = None if sl is None else sl.ctypes.data
        k.init_rows(
            keys.ctypes.data, ptr, len(keys), dim, int(_seed_mix(seed)), float(bound), out.ctypes.data
        )
        return
    with np.errstate(over="ignore"):
        base = mix64(keys.view(np.uint64) ^ _seed_mix(seed))
        h = mix64(base[:, None] * _GOLDEN + np.arange(dim, dtype=np.uint64)[None, :])
    unit = (h >> np.uint64(40)).astype(np.float64) / float(1 << 24)  # 24 bits: exact in float32
    rows = ((unit * 2.0 - 1.0) * bound).astype(np.float32)
    if slots is None:
        out[: len(keys)] = rows
    else:
        out[slots] = rows


def init_rows(keys: torch.Tensor, dim: int, seed: int, bound: float) -> torch.Tensor:
    """Initial rows of ``keys``: uniform in ``[-bound, bound)``, a pure function of (seed, key, column).

    Example:
        >>> a = init_rows(torch.tensor([7, 3]), 4, seed=0, bound=0.5)
        >>> torch.equal(a[0], init_rows(torch.tensor([7]), 4, seed=0, bound=0.5)[0])
        True
    """
    out = np.empty((len(keys), dim), dtype=np.float32)
    write_init(keys.numpy(), None, dim, seed, bound, out)
    return torch.from_numpy(out)
