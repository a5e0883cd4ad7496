"""The dynamic tables' C kernels: compiled on first use, cached on disk, loaded with ctypes.

Loops that NumPy cannot run without per-key Python or many passes: probing a linear-probing
hash index (lookup, insert, and both in one pass, with software prefetch), doubling it in
place, a dump's rows in key order (partitioning the keys into ranges to sort, then finding
each key and copying its rows in one pass) and writing initial rows
(:func:`reckpt.dynamic.table.init_rows`, bitwise the NumPy formula). The source is
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
#include <string.h>

/* An index entry: the key's full 64-bit hash (SplitMix64 is a bijection on 64 bits, so the
   hash identifies the key: no key is read to confirm a match) and its 31-bit id; id
   EMPTY_ID: a free slot, TOMB_ID: a deleted one. 12 bytes, packed. */
typedef struct __attribute__((packed)) { uint64_t h; uint32_t id; } entry;
#define EMPTY_ID 0xFFFFFFFFu
#define TOMB_ID 0xFFFFFFFEu
#define AHEAD 16          /* keys hashed and prefetched ahead of the one probed */
#define RING (2 * AHEAD)  /* a power of two */

static inline uint64_t mix(uint64_t x) {
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

static inline void ahead(const entry *t, uint64_t h, uint64_t mask, int write) {
    const char *at = (const char *)(t + (h & mask));
    if (write) { __builtin_prefetch(at, 1); __builtin_prefetch(at + 11, 1); }
    else { __builtin_prefetch(at); __builtin_prefetch(at + 11); }
}

/* Step i of a batch loop (i from -AHEAD to n-1): hash key i+AHEAD into the ring and prefetch
   its slot; the hash of key i (meaningful for i >= 0) is then hs[i & (RING - 1)]. */
static inline void ring_step(const entry *t, uint64_t mask, const int64_t *q, int64_t n, int64_t i,
                             uint64_t *hs, int write) {
    if (i + AHEAD < n) {
        uint64_t h = mix((uint64_t)q[i + AHEAD]);
        hs[(i + AHEAD) & (RING - 1)] = h;
        ahead(t, h, mask, write);
    }
}

/* Ids of keys q[0..n) (-1: absent); pos (may be NULL) gets each key's slot (-1: absent).
   Returns the keys found. Each key's slot is prefetched AHEAD keys before it is probed. */
int64_t rk_find(const entry *t, uint64_t mask, const int64_t *q, int64_t n, int64_t *ids, int64_t *pos) {
    uint64_t hs[RING];
    int64_t hits = 0;
    for (int64_t i = -AHEAD; i < n; i++) {
        ring_step(t, mask, q, n, i, hs, 0);
        if (i < 0) continue;
        uint64_t h = hs[i & (RING - 1)], p = h & mask;
        int64_t id = -1, where = -1;
        for (;;) {
            uint32_t s = t[p].id;
            if (s == EMPTY_ID) break;
            if (s != TOMB_ID && t[p].h == h) { id = s; where = (int64_t)p; hits++; break; }
            p = (p + 1) & mask;
        }
        ids[i] = id;
        if (pos) pos[i] = where;
    }
    return hits;
}

/* Insert keys q[0..n) (absent, distinct) with ids[0..n); returns the tombstones reused. */
int64_t rk_insert(entry *t, uint64_t mask, const int64_t *q, const int64_t *ids, int64_t n) {
    uint64_t hs[RING];
    int64_t tombs = 0;
    for (int64_t i = -AHEAD; i < n; i++) {
        ring_step(t, mask, q, n, i, hs, 1);
        if (i < 0) continue;
        uint64_t h = hs[i & (RING - 1)], p = h & mask;
        while (t[p].id < TOMB_ID) p = (p + 1) & mask;
        if (t[p].id == TOMB_ID) tombs++;
        t[p].h = h;
        t[p].id = (uint32_t)ids[i];
    }
    return tombs;
}

/* Ids of distinct keys q[0..n), inserting the absent ones: the j-th absent key (in q's order)
   gets id cand[j]; created[j] = its position in q. Returns how many were inserted; *tombs gets
   the tombstones reused. One probe per key (a lookup and an insert in one pass). */
int64_t rk_upsert(entry *t, uint64_t mask, const int64_t *q, int64_t n, const int64_t *cand,
                  int64_t *ids, int64_t *created, int64_t *tombs) {
    uint64_t hs[RING];
    int64_t made = 0, reused = 0;
    for (int64_t i = -AHEAD; i < n; i++) {
        ring_step(t, mask, q, n, i, hs, 1);
        if (i < 0) continue;
        uint64_t h = hs[i & (RING - 1)], p = h & mask, free = ~0ULL;
        int64_t id = -1;
        for (;;) {
            uint32_t s = t[p].id;
            if (s == EMPTY_ID) { if (free == ~0ULL) free = p; break; }
            if (s == TOMB_ID) { if (free == ~0ULL) free = p; }
            else if (t[p].h == h) { id = s; break; }
            p = (p + 1) & mask;
        }
        if (id < 0) {
            if (t[free].id == TOMB_ID) reused++;
            id = cand[made];
            t[free].h = h;
            t[free].id = (uint32_t)id;
            created[made++] = i;
        }
        ids[i] = id;
    }
    *tombs = reused;
    return made;
}

/* Double a table of s entries in place (the memory holds 2s; the upper half is written here),
   dropping tombstones. The old slots are visited once, in order, from one that was empty (no
   chain crosses it); each entry moves to the first free slot from its new home, which is never
   an unvisited slot, so the writes run almost sequentially. An entry whose probe would wrap
   past the end waits in spill (nspill entries at most) until the pass is done. Returns the
   live entries, or -1 when spill overflowed (the table is then garbage: rebuild it). */
int64_t rk_grow(entry *t, uint64_t s, entry *spill, int64_t nspill) {
    uint64_t mask = 2 * s - 1, start = 0;
    int64_t live = 0, spilled = 0;
    memset(t + s, 0xFF, s * sizeof(entry));
    while (start < s && t[start].id != EMPTY_ID) start++;
    if (start == s) return -1;
    for (uint64_t k = 1; k < s; k++) {
        uint64_t i = (start + k) & (s - 1);
        uint32_t id = t[i].id;
        if (id == EMPTY_ID) continue;
        uint64_t h = t[i].h;
        t[i].h = ~0ULL;
        t[i].id = EMPTY_ID;
        if (id == TOMB_ID) continue;
        live++;
        uint64_t p = h & mask;
        while (t[p].id != EMPTY_ID && p != mask) p++;
        if (t[p].id != EMPTY_ID) {
            if (spilled == nspill) return -1;
            spill[spilled].h = h;
            spill[spilled++].id = id;
            continue;
        }
        t[p].h = h;
        t[p].id = id;
    }
    for (int64_t j = 0; j < spilled; j++) {
        uint64_t p = spill[j].h & mask;
        while (t[p].id != EMPTY_ID) p = (p + 1) & mask;
        t[p] = spill[j];
    }
    return live;
}

/* One of several threads building a table from keys q[0..n) with ids 0..n-1: empty the slots
   [lo, hi), then insert the keys whose home slot is in [lo, hi); a key whose probe would leave
   the range goes to spill (its position in q; nspill at most) for the caller to insert after.
   Only slots in [lo, hi) are touched, so threads with disjoint ranges need no lock. A key
   equal to one already there is not inserted but counted. Returns the keys inserted;
   out[0]: repeated keys, out[1]: keys spilled (-1: spill overflowed). */
int64_t rk_build(entry *t, uint64_t mask, const int64_t *q, int64_t n, uint64_t lo, uint64_t hi,
                 int64_t *spill, int64_t nspill, int64_t *out) {
    int64_t made = 0, dups = 0, spilled = 0;
    memset(t + lo, 0xFF, (hi - lo) * sizeof(entry));
    for (int64_t i = 0; i < n; i++) {
        uint64_t h = mix((uint64_t)q[i]), p = h & mask;
        if (p < lo || p >= hi) continue;
        while (p < hi && t[p].id != EMPTY_ID && t[p].h != h) p++;
        if (p == hi) {
            if (spilled == nspill) { out[0] = dups; out[1] = -1; return made; }
            spill[spilled++] = i;
        } else if (t[p].id != EMPTY_ID) {
            dups++;
        } else {
            t[p].h = h;
            t[p].id = (uint32_t)i;
            made++;
        }
    }
    out[0] = dups;
    out[1] = spilled;
    return made;
}

/* For each key q[i] (all present): find its id, then copy its row of every column c (srcs[c] +
   id * widths[c], widths[c] bytes) to dsts[c] + i * widths[c]. Keys are hashed and their slots
   prefetched 2 * ROWS_AHEAD keys ahead, their rows prefetched ROWS_AHEAD keys ahead (32: 15%
   faster than 16 at 51M rows, no gain at 64). Returns the keys found (a missing key's rows are
   left as they were). */
#define ROWS_AHEAD 32
int64_t rk_find_gather(const entry *t, uint64_t mask, const int64_t *q, int64_t n, int64_t ncols,
                       const int64_t *srcs, const int64_t *widths, const int64_t *dsts) {
    enum { R = 4 * ROWS_AHEAD };
    uint64_t hs[R];
    int64_t idr[R], found = 0;
    for (int64_t i = -2 * ROWS_AHEAD; i < n; i++) {
        int64_t a = i + 2 * ROWS_AHEAD, b = i + ROWS_AHEAD;
        if (a < n) {
            uint64_t h = mix((uint64_t)q[a]);
            hs[a & (R - 1)] = h;
            ahead(t, h, mask, 0);
        }
        if (b >= 0 && b < n) {
            uint64_t h = hs[b & (R - 1)], p = h & mask;
            int64_t id = -1;
            for (;;) {
                uint32_t s = t[p].id;
                if (s == EMPTY_ID) break;
                if (s != TOMB_ID && t[p].h == h) { id = s; break; }
                p = (p + 1) & mask;
            }
            idr[b & (R - 1)] = id;
            if (id >= 0) {
                for (int64_t c = 0; c < ncols; c++) {
                    const char *row = (const char *)srcs[c] + id * widths[c];
                    __builtin_prefetch(row);
                    if (widths[c] > 64) __builtin_prefetch(row + widths[c] - 1);
                }
            }
        }
        if (i >= 0) {
            int64_t id = idr[i & (R - 1)];
            if (id < 0) continue;
            found++;
            for (int64_t c = 0; c < ncols; c++) {
                int64_t w = widths[c];
                const char *from = (const char *)srcs[c] + id * w;
                char *to = (char *)dsts[c] + i * w;
                if (w == 4) memcpy(to, from, 4);
                else if (w == 8) memcpy(to, from, 8);
                else if (w == 64) memcpy(to, from, 64);
                else memcpy(to, from, (size_t)w);
            }
        }
    }
    return found;
}

static inline int64_t bucket_of(int64_t k, const int64_t *split, int64_t nsplit) {
    int64_t lo = 0, hi = nsplit;
    while (lo < hi) {
        int64_t mid = (lo + hi) >> 1;
        if (split[mid] <= k) lo = mid + 1; else hi = mid;
    }
    return lo;
}

/* Partitioning keys into nsplit + 1 ranges by ascending splitters (a key's range: how many
   splitters are <= it), over ids [lo, hi) of keys (those with flags[i] & 1 when flags is not
   NULL), so that two threads can each take half: rk_count adds each range's keys to
   counts[0..nsplit]; rk_scatter writes each key to out[at[range]++]. */
void rk_count(const int64_t *keys, const uint8_t *flags, int64_t lo, int64_t hi, const int64_t *split,
              int64_t nsplit, int64_t *counts) {
    for (int64_t i = lo; i < hi; i++)
        if (!flags || (flags[i] & 1)) counts[bucket_of(keys[i], split, nsplit)]++;
}

void rk_scatter(const int64_t *keys, const uint8_t *flags, int64_t lo, int64_t hi, const int64_t *split,
                int64_t nsplit, int64_t *at, int64_t *out) {
    for (int64_t i = lo; i < hi; i++)
        if (!flags || (flags[i] & 1)) out[at[bucket_of(keys[i], split, nsplit)]++] = keys[i];
}

/* The i in [0, n) with (flags[i] & mask) == want, ascending, into out (NULL: only count);
   returns how many. The ids are written eight flags at a time: a word with no matching byte
   (most of them when few ids match: the touched rows of a delta) costs a few operations. */
int64_t rk_select(const uint8_t *flags, int64_t n, uint8_t mask, uint8_t want, int64_t *out) {
    const uint64_t ones = 0x0101010101010101ULL, high = 0x8080808080808080ULL;
    const uint64_t m = ones * mask, w = ones * want;
    int64_t k = 0, i = 0;
    if (!out) {  /* a reduction the compiler vectorises */
        for (; i < n; i++) k += (flags[i] & mask) == want;
        return k;
    }
    for (; i + 8 <= n; i += 8) {
        uint64_t x;
        memcpy(&x, flags + i, 8);
        uint64_t y = (x & m) ^ w;  /* a zero byte: a match */
        if (!((y - ones) & ~y & high)) continue;
        for (int64_t j = i; j < i + 8; j++)
            if ((flags[j] & mask) == want) { if (out) out[k] = j; k++; }
    }
    for (; i < n; i++)
        if ((flags[i] & mask) == want) { if (out) out[k] = i; k++; }
    return k;
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
        self.find.argtypes = [_P, _U, _P, _I, _P, _P]
        self.find.restype = _I
        self.insert = lib.rk_insert
        self.insert.argtypes = [_P, _U, _P, _P, _I]
        self.insert.restype = _I
        self.upsert = lib.rk_upsert
        self.upsert.argtypes = [_P, _U, _P, _I, _P, _P, _P, _P]
        self.upsert.restype = _I
        self.grow = lib.rk_grow
        self.grow.argtypes = [_P, _U, _P, _I]
        self.grow.restype = _I
        self.build = lib.rk_build
        self.build.argtypes = [_P, _U, _P, _I, _U, _U, _P, _I, _P]
        self.build.restype = _I
        self.find_gather = lib.rk_find_gather
        self.find_gather.argtypes = [_P, _U, _P, _I, _I, _P, _P, _P]
        self.find_gather.restype = _I
        self.select = lib.rk_select
        self.select.argtypes = [_P, _I, ctypes.c_uint8, ctypes.c_uint8, _P]
        self.select.restype = _I
        self.count = lib.rk_count
        self.count.argtypes = [_P, _P, _I, _I, _P, _I, _P]
        self.count.restype = None
        self.scatter = lib.rk_scatter
        self.scatter.argtypes = [_P, _P, _I, _I, _P, _I, _P, _P]
        self.scatter.restype = None
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
