"""The dynamic tables' C kernels: compiled on first use, cached on disk, loaded with ctypes.

Three loops that NumPy cannot run without per-key Python or many passes: probing a
linear-probing hash index (lookup and insert, with software prefetch) and writing initial
rows (:func:`reckpt.dynamic.table.init_rows`, bitwise the NumPy formula). The source is
this module's :data:`SOURCE`; it needs no Python or torch headers, so a C compiler builds
it in well under a second. The shared library is cached as
``<cache>/reckpt-dyn-<hash>.so`` (``<cache>``: ``$RECKPT_KERNEL_CACHE``, else
``$XDG_CACHE_HOME/reckpt`` or ``~/.cache/reckpt``, else the temp dir), written under a
temporary name and renamed into place, so concurrent processes (every rank of a job) never
load a half-written file. Any failure (no compiler, a read-only cache, a library that fails
its self-check) leaves the tables on their NumPy path, which gives the same results more
slowly (:func:`reckpt.dynamic.index.kernels` decides, once per process).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["SOURCE", "Kernels", "load", "cache_dir"]

SOURCE = r"""
#include <stdint.h>
#include <stddef.h>

/* An entry: the hash's high 32 bits (tag) << 32 | the id; id field EMPTY_ID: free slot,
   TOMB_ID: deleted. Ids are below 2^31, so neither marker is ever an id. */
#define EMPTY_ID 0xFFFFFFFFu
#define TOMB_ID 0xFFFFFFFEu
#define GROUP 64

static inline uint64_t mix(uint64_t x) {
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

/* Ids of keys q[0..n) (-1: absent) in the linear-probing table; store[id] is id's key.
   pos (may be NULL) gets each key's table position (-1: absent). Group prefetching: hash
   GROUP keys and prefetch their table lines, then find each first tag match and prefetch
   its key, then verify (a false tag match, 1 in 2^32, just probes on). */
int64_t rk_find(const uint64_t *table, uint64_t mask, const int64_t *store, const int64_t *q,
                int64_t n, int64_t *ids, int64_t *pos) {
    uint64_t hs[GROUP], at[GROUP];
    int64_t hits = 0;
    for (int64_t g = 0; g < n; g += GROUP) {
        int64_t m = n - g < GROUP ? n - g : GROUP;
        for (int64_t j = 0; j < m; j++) {
            hs[j] = mix((uint64_t)q[g + j]);
            __builtin_prefetch(table + (hs[j] & mask));
        }
        for (int64_t j = 0; j < m; j++) {
            uint64_t p = hs[j] & mask;
            uint32_t tag = (uint32_t)(hs[j] >> 32);
            for (;;) {
                uint64_t e = table[p];
                uint32_t s = (uint32_t)e;
                if (s == EMPTY_ID) { p = ~0ULL; break; }
                if (s != TOMB_ID && (uint32_t)(e >> 32) == tag) { __builtin_prefetch(store + s); break; }
                p = (p + 1) & mask;
            }
            at[j] = p;
        }
        for (int64_t j = 0; j < m; j++) {
            int64_t i = g + j, id = -1, where = -1;
            uint64_t p = at[j];
            uint32_t tag = (uint32_t)(hs[j] >> 32);
            while (p != ~0ULL) {
                uint64_t e = table[p];
                uint32_t s = (uint32_t)e;
                if (s == EMPTY_ID) break;
                if (s != TOMB_ID && (uint32_t)(e >> 32) == tag && store[s] == q[i]) {
                    id = s; where = (int64_t)p; hits++; break;
                }
                p = (p + 1) & mask;
            }
            ids[i] = id;
            if (pos) pos[i] = where;
        }
    }
    return hits;
}

/* Insert keys q[0..n) (absent, distinct) with ids[0..n); returns the tombstones reused. */
int64_t rk_insert(uint64_t *table, uint64_t mask, const int64_t *q, const int64_t *ids, int64_t n) {
    uint64_t hs[GROUP];
    int64_t tombs = 0;
    for (int64_t g = 0; g < n; g += GROUP) {
        int64_t m = n - g < GROUP ? n - g : GROUP;
        for (int64_t j = 0; j < m; j++) {
            hs[j] = mix((uint64_t)q[g + j]);
            __builtin_prefetch(table + (hs[j] & mask), 1);
        }
        for (int64_t j = 0; j < m; j++) {
            uint64_t p = hs[j] & mask;
            while ((uint32_t)table[p] < TOMB_ID) p = (p + 1) & mask;
            if ((uint32_t)table[p] == TOMB_ID) tombs++;
            table[p] = (hs[j] & 0xFFFFFFFF00000000ULL) | (uint64_t)(uint32_t)ids[g + j];
        }
    }
    return tombs;
}

/* Initial rows of keys[0..n) into out + slot * dim (slot = slots[i], or i when slots is NULL).
   The formula of reckpt.dynamic.table.init_rows, bit for bit: integer steps, a 24-bit
   integer to double (exact), then the same double operations, built without contraction. */
CLONES
void rk_init_rows(const int64_t *keys, const int64_t *slots, int64_t n, int64_t dim,
                  uint64_t seed_mix, double bound, float *out) {
    const uint64_t golden = 0x9E3779B97F4A7C15ULL;
    for (int64_t i = 0; i < n; i++) {
        uint64_t base = mix((uint64_t)keys[i] ^ seed_mix);
        float *row = out + (slots ? slots[i] : i) * dim;
        for (int64_t c = 0; c < dim; c++) {
            uint64_t h = mix(base * golden + (uint64_t)c);
            double unit = (double)(int32_t)(h >> 40) / 16777216.0;
            row[c] = (float)((unit * 2.0 - 1.0) * bound);
        }
    }
}
"""

_FLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-strict-aliasing", "-std=c99")
_P = ctypes.c_void_p
_I = ctypes.c_int64
_U = ctypes.c_uint64


class Kernels:
    """The loaded library's functions, with their ctypes signatures (pointers as ``int``)."""

    def __init__(self, lib: ctypes.CDLL, path: str) -> None:
        self.path = path
        self.find = lib.rk_find
        self.find.argtypes = [_P, _U, _P, _P, _I, _P, _P]
        self.find.restype = _I
        self.insert = lib.rk_insert
        self.insert.argtypes = [_P, _U, _P, _P, _I]
        self.insert.restype = _I
        self.init_rows = lib.rk_init_rows
        self.init_rows.argtypes = [_P, _P, _I, _I, _U, ctypes.c_double, _P]
        self.init_rows.restype = None


def cache_dir() -> Path:
    """Where compiled kernels are kept (see the module docstring)."""
    env = os.environ.get("RECKPT_KERNEL_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "reckpt" if xdg else Path.home() / ".cache" / "reckpt"


def _compiler() -> str | None:
    for name in (os.environ.get("CC", ""), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


_CLONES = '__attribute__((target_clones("arch=skylake-avx512", "avx2", "default")))'


def _build(cc: str) -> str:
    """The path of the compiled library, building it when no cached copy exists.

    The row initialiser is first built with ``target_clones`` (an AVX-512 and an AVX2 copy
    picked at load time); a compiler without it builds the plain loop.
    """
    tag = hashlib.sha256("\0".join([SOURCE, cc, *_FLAGS, sys.platform]).encode()).hexdigest()[:16]
    last: Exception | None = None
    for folder in (cache_dir(), Path(tempfile.gettempdir()) / f"reckpt-kernels-{os.getuid()}"):
        target = folder / f"reckpt-dyn-{tag}.so"
        if target.is_file():
            return str(target)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as tmp:
                src, out = Path(tmp) / "kernels.c", Path(tmp) / "kernels.so"
                for clones in (_CLONES, ""):
                    src.write_text(SOURCE.replace("CLONES", clones))
                    done = subprocess.run(
                        [cc, *_FLAGS, "-o", str(out), str(src)], capture_output=True, text=True, timeout=120
                    )
                    if done.returncode == 0:
                        break
                if done.returncode:
                    raise subprocess.SubprocessError(f"exit {done.returncode}: {done.stderr[-2000:]}")
                os.replace(out, target)  # atomic: a concurrent build of the same tag is identical
            return str(target)
        except (OSError, subprocess.SubprocessError) as e:
            last = RuntimeError(f"{cc} in {folder}: {e}")
    raise RuntimeError(f"building the dynamic-table kernels failed: {last}")


def load() -> Kernels:
    """Build (or find in the cache) and load the kernels.

    Raises:
        RuntimeError: no C compiler, the build failed, or the library does not load.
    """
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc, clang or $CC) on PATH")
    path = _build(cc)
    try:
        return Kernels(ctypes.CDLL(path), path)
    except (OSError, AttributeError) as e:
        raise RuntimeError(f"loading {path}: {e}") from e
