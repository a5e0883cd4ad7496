"""Dynamic tables at scale: the vectorised index against the per-key Python table it replaced.

``python -m benchmarks.dynamic_table`` (defaults: 50M rows of dim 16 in one process, batches
of 100k unique keys) writes ``benchmarks/results/dynamic_table.json`` and ``.md``. Each part
runs in a fresh process (spawned), so that the resident-memory figures start clean:

- **new**: ``DynamicTable`` (unbounded, LRU) filled by ``lookup(train=True)`` of 100k new
  keys at a time; the peak resident memory it adds (``VmHWM`` after a reset) against the row
  bytes (keys + values + Adagrad state + score); lookups of 100k existing keys, read only
  and training, next to ``torch.searchsorted`` over the same keys sorted (the same batches,
  the same process); then ``--repeats`` rounds of a full dump (``dynamic_writer``: the
  snapshot, copied only if the table changes first, then the files written in parallel and
  fsynced) and a cold load (``prepare_dynamic`` + ``apply`` into a new table), interleaved
  with the disk's ceiling, raw fsynced writes and cold reads of the same bytes in 1/2/4/8 parallel
  streams, the order rotated every round; then a delta of 1% touched rows.
- **old**: a copy of the pre-vectorisation table (:class:`OldTable`, per-key dicts and sets)
  at ``--baseline-rows`` (it cannot hold 50M rows here: ~5x memory overhead), and **new**
  at that size too, for same-size ratios.
- **candidates**: the index alone (find / insert of 100k keys) for each design considered:
  a dict, searchsorted on sorted keys, the NumPy open-addressing path and the C kernels.

Keys are ``splitmix64(i)`` (distinct, spread over int64); a batch is sorted, as
``torch.unique`` hands it to the table. Medians over repeats; see docs/dynamic.md.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (
    drop_cache,
    human_bytes,
    median,
    provenance,
    require_free_space,
    timed,
    write_results,
)
from reckpt.dynamic.index import KeyMap, kernels, mix64
from reckpt.dynamic.table import DynamicTable

_CHUNK = 64 << 20


# -- the table before this change, kept as the baseline (per-key Python) --------------------
def _old_init_rows(keys: torch.Tensor, dim: int, seed: int, bound: float) -> torch.Tensor:
    with np.errstate(over="ignore"):
        k = keys.numpy().astype(np.int64).view(np.uint64)
        base = mix64(k ^ mix64(np.array([seed], dtype=np.int64).view(np.uint64)))
        h = mix64(base[:, None] * np.uint64(0x9E3779B97F4A7C15) + np.arange(dim, dtype=np.uint64)[None, :])
    unit = (h >> np.uint64(40)).astype(np.float64) / float(1 << 24)
    return torch.from_numpy(((unit * 2.0 - 1.0) * bound).astype(np.float32)).reshape(len(keys), dim)


class OldTable:
    """``reckpt.dynamic.table.DynamicTable`` before the vectorised index (unbounded LRU parts)."""

    def __init__(self, dim: int) -> None:
        self.dim, self.clock, self.seed, self.init_bound = dim, 0, 0, dim**-0.5
        self.slot_of: dict[int, int] = {}
        self.counter: dict[int, int] = {}
        self.touched: set[int] = set()
        self.removed: set[int] = set()
        self.keys = torch.zeros(0, dtype=torch.int64)
        self.values, self.opt = torch.zeros(0, dim), torch.zeros(0)
        self.scores = torch.zeros(0, dtype=torch.int64)
        self._free: list[int] = []

    def _grow(self, need: int) -> None:
        old = len(self.keys)
        new = max(need + old, 2 * old, 64)
        self.keys = torch.cat([self.keys, torch.zeros(new - old, dtype=torch.int64)])
        self.values = torch.cat([self.values, torch.zeros(new - old, self.dim)])
        self.opt = torch.cat([self.opt, torch.zeros(new - old)])
        self.scores = torch.cat([self.scores, torch.zeros(new - old, dtype=torch.int64)])
        self._free.extend(range(new - 1, old - 1, -1))

    def __len__(self) -> int:
        return len(self.slot_of)

    def lookup(self, keys: torch.Tensor, counts: torch.Tensor | None, train: bool) -> torch.Tensor:
        key_list = keys.tolist()
        get = self.slot_of.get
        slots = torch.tensor([get(k, -1) for k in key_list], dtype=torch.int64)
        if not train:
            return slots
        self.clock += 1
        cnt = counts if counts is not None else torch.ones(len(key_list), dtype=torch.int64)
        have = slots >= 0
        self.scores[slots[have]] = self.clock
        self.touched.update(key_list)
        count_list = cnt.tolist()
        fresh: list[tuple[int, int, int]] = []
        for i in (~have).nonzero().squeeze(1).tolist():
            k = key_list[i]
            freq = self.counter.get(k, 0) + count_list[i]
            self.counter.pop(k, None)
            fresh.append((i, k, freq))
        if fresh:
            if len(self._free) < len(fresh):
                self._grow(len(fresh) - len(self._free))
            new_keys = [k for _, k, _ in fresh]
            new_slots = [self._free.pop() for _ in fresh]
            self.slot_of.update(zip(new_keys, new_slots, strict=True))
            self.removed.difference_update(new_keys)
            idx = torch.tensor(new_slots, dtype=torch.int64)
            key_t = torch.tensor(new_keys, dtype=torch.int64)
            slots[torch.tensor([i for i, _, _ in fresh], dtype=torch.int64)] = idx
            self.keys[idx] = key_t
            self.scores[idx] = self.clock
            self.values[idx] = _old_init_rows(key_t, self.dim, self.seed, self.init_bound)
            self.opt[idx] = 0.0
        return slots

    def export(self, keys: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        wanted = (
            sorted(self.slot_of) if keys is None else sorted(k for k in keys.tolist() if k in self.slot_of)
        )
        slots = torch.tensor([self.slot_of[k] for k in wanted], dtype=torch.int64)
        return (torch.tensor(wanted, dtype=torch.int64), self.values[slots].clone(),
                self.opt[slots].clone(), self.scores[slots].clone())  # fmt: skip

    def touched_keys(self) -> torch.Tensor:
        return torch.tensor(sorted(k for k in self.touched if k in self.slot_of), dtype=torch.int64)

    def clear_touched(self) -> None:
        self.touched.clear()
        self.removed.clear()


# -- helpers -------------------------------------------------------------------------------
def keys_of(idx: np.ndarray) -> np.ndarray:
    """The benchmark's keys: ``splitmix64(i)`` as int64 (distinct for distinct ``i``)."""
    return mix64(idx.astype(np.uint64)).view(np.int64)


def batch_keys(start: int, n: int) -> torch.Tensor:
    return torch.from_numpy(np.sort(keys_of(np.arange(start, start + n))))


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM back to the current RSS
    except OSError:
        pass


def _parallel(jobs: list[Any]) -> float:
    """Seconds until every job (run on its own thread) finished."""
    threads = [threading.Thread(target=j) for j in jobs]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def raw_streams(folder: str, total: int, streams: int, buf: memoryview) -> tuple[float, float]:
    """Seconds to write ``total`` bytes in ``streams`` parallel fsynced files, then to read them cold."""
    os.makedirs(folder, exist_ok=True)
    share = total // streams
    paths = [os.path.join(folder, f"raw{i}") for i in range(streams)]

    def write(path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            left = share
            while left:
                left -= os.write(fd, buf[: min(left, len(buf))])
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(path: str) -> None:
        local = bytearray(len(buf))
        with open(path, "rb", buffering=0) as f:
            while f.readinto(local):
                pass

    w = _parallel([lambda p=p: write(p) for p in paths])
    drop_cache(folder)
    r = _parallel([lambda p=p: read(p) for p in paths])
    shutil.rmtree(folder)
    return w, r


def fill(table: Any, rows: int, batch: int, offset: int = 0) -> float:
    """Seconds spent in training lookups of ``batch`` new keys at a time, creating ``rows`` rows."""
    ones = torch.ones(batch, dtype=torch.int64)
    spent = 0.0
    for start in range(offset, offset + rows, batch):
        keys = batch_keys(start, min(batch, offset + rows - start))  # not timed: the caller's work
        t0 = time.perf_counter()
        table.lookup(keys, ones[: len(keys)], True)
        spent += time.perf_counter() - t0
    return spent


def lookups(table: Any, rows: int, batch: int, repeats: int) -> dict[str, float]:
    """Keys/s of reads and training lookups of ``batch`` existing keys, and of searchsorted."""
    rng = np.random.default_rng(1)
    batches = [
        torch.from_numpy(np.sort(keys_of(rng.choice(rows, batch, replace=False)))) for _ in range(repeats)
    ]
    out = {}
    for name, train in (("lookup read", False), ("lookup train", True)):
        out[name] = batch / median([timed(lambda b=b, t=train: table.lookup(b, None, t)) for b in batches])
    sorted_keys = torch.from_numpy(np.sort(keys_of(np.arange(rows))))

    def search(b: torch.Tensor) -> None:
        pos = torch.searchsorted(sorted_keys, b).clamp_(max=rows - 1)
        torch.where(sorted_keys[pos] == b, pos, -1)

    out["searchsorted"] = batch / median([timed(lambda b=b: search(b)) for b in batches])
    return out


def profile(fn: Any, top: int) -> list[str]:
    """The ``top`` functions by own time while ``fn`` runs (cProfile), as text lines."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.runcall(fn)
    st = pstats.Stats(prof)
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]  # type: ignore[attr-defined]
    total = sum(v[2] for v in st.stats.values()) or 1.0  # type: ignore[attr-defined]
    return [
        f"{v[2] / total:6.1%} {v[2]:8.3f}s {v[1]:6d}x {f[2]} ({os.path.basename(f[0])}:{f[1]})"
        for f, v in rows
    ]


def touch_some(table: Any, rows: int, n: int, batch: int) -> None:
    """Training lookups of ``n`` distinct existing keys: an incremental checkpoint's rows."""
    idx = np.random.default_rng(2).choice(rows, n, replace=False)
    for start in range(0, n, batch):
        table.lookup(torch.from_numpy(np.sort(keys_of(idx[start : start + batch]))), None, True)


# -- the parts, each in a fresh process ------------------------------------------------------
def part_table(kind: str, rows: int, dim: int, batch: int, repeats: int) -> dict[str, Any]:
    """Fill, look up, snapshot and delta-snapshot one table (``"old"`` or ``"new"``)."""
    table: Any = OldTable(dim) if kind == "old" else DynamicTable(dim)
    base = _status("VmRSS")
    _reset_peak()
    res: dict[str, Any] = {"kind": kind, "rows": rows, "row_bytes": rows * (8 + 4 * dim + 4 + 8)}
    res["insert_s"] = fill(table, rows, batch)
    res["rss_growth"] = _status("VmHWM") - base
    res.update(lookups(table, rows, batch, 3 * repeats))
    res["export_s"] = median([timed(table.export) for _ in range(repeats)])
    table.clear_touched()
    touch_some(table, rows, max(1, rows // 100), batch)
    res["delta_export_s"] = median(
        [timed(lambda: table.export(table.touched_keys())) for _ in range(repeats)]
    )
    return res


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def part_scale(rows: int, dim: int, batch: int, repeats: int, work: str) -> dict[str, Any]:
    """The 50M-row table: fill, look up, then dump / load rounds beside the disk's ceiling, then a delta."""
    import gc

    from reckpt.dynamic import DynamicEmbedding, dynamic_writer, prepare_dynamic
    from reckpt.storage.core import storage_for

    emb = DynamicEmbedding(dim, name="t")
    base = _status("VmRSS")
    _reset_peak()
    res: dict[str, Any] = {"kind": "new", "rows": rows, "row_bytes": rows * (8 + 4 * dim + 4 + 8)}
    res["insert_s"] = fill(emb.table, rows, batch)
    res["rss_growth"] = _status("VmHWM") - base
    res["index_bytes"] = int(emb.table.rows.index.table.nbytes)
    res.update(lookups(emb.table, rows, batch, 3 * repeats))
    res["profile"] = profile(lambda: fill(emb.table, 10 * batch, batch, offset=rows), 10)
    rows += 10 * batch
    res["rows"], res["row_bytes"] = rows, rows * (8 + 4 * dim + 4 + 8)
    gc.collect()
    buf = memoryview(np.random.default_rng(0).integers(0, 256, _CHUNK, dtype=np.uint8).tobytes())
    variants: list[Any] = ["reckpt", 1, 2, 4, 8]
    runs: dict[str, list[float]] = {}
    nbytes = 0
    for r in range(repeats):
        for v in variants[r % len(variants) :] + variants[: r % len(variants)]:
            if v != "reckpt":
                w, rd = raw_streams(os.path.join(work, "raw"), nbytes or res["row_bytes"], v, buf)
                runs.setdefault(f"write x{v}", []).append(w)
                runs.setdefault(f"read x{v}", []).append(rd)
                continue
            d = os.path.join(work, "ckpt")
            t0 = time.perf_counter()
            writer = dynamic_writer(emb)
            t1 = time.perf_counter()
            assert writer is not None
            writer(storage_for(d), d)
            t2 = time.perf_counter()
            del writer
            nbytes = _dir_bytes(d)
            drop_cache(d)
            emb = DynamicEmbedding(dim, name="t")  # the dumped table goes: one table in memory
            gc.collect()
            t3 = time.perf_counter()
            pending = prepare_dynamic(d, emb)
            t4 = time.perf_counter()
            pending.apply()
            t5 = time.perf_counter()
            del pending
            assert len(emb.table) == rows
            shutil.rmtree(d)
            for name, s in (("dump snapshot", t1 - t0), ("dump write", t2 - t1), ("dump", t2 - t0),
                            ("load read", t4 - t3), ("load apply", t5 - t4), ("load", t5 - t3)):  # fmt: skip
                runs.setdefault(name, []).append(s)
    res["dump_bytes"] = nbytes
    emb.table.clear_touched()
    touch_some(emb.table, rows, rows // 100, batch)
    res["delta_rows"] = len(emb.table.touched_keys())
    for r in range(repeats):
        d = os.path.join(work, f"delta{r}")
        t0 = time.perf_counter()
        writer = dynamic_writer(emb, keys="touched")
        assert writer is not None
        writer(storage_for(d), d)
        runs.setdefault("delta dump", []).append(time.perf_counter() - t0)
        res["delta_bytes"] = _dir_bytes(d)
        shutil.rmtree(d)
    res["runs"] = runs
    return res


def part_candidates(rows: int, batch: int, repeats: int) -> dict[str, Any]:
    """Find and insert ``batch`` keys in an index of ``rows`` keys, per design considered."""
    keys = keys_of(np.arange(rows))
    rng = np.random.default_rng(3)
    hits = [np.sort(keys_of(rng.choice(rows, batch, replace=False))) for _ in range(repeats)]
    news = [np.sort(keys_of(np.arange(rows + i * batch, rows + (i + 1) * batch))) for i in range(repeats)]
    out: dict[str, dict[str, float]] = {}

    def rate(fn: Any, batches: list[np.ndarray]) -> float:
        return batch / median([timed(lambda b=b: fn(b)) for b in batches])

    out["dict (before)"] = _dict_rates(keys, hits, news, rate)
    out["searchsorted on sorted keys"] = _sorted_rates(keys, hits, news, rate)
    for name, k in (("hash index, NumPy path", None), ("hash index, C kernels", kernels())):
        if name.endswith("kernels") and k is None:
            continue
        m = KeyMap({}, k)
        for start in range(0, rows, 1 << 20):
            m.add(keys[start : start + (1 << 20)])
        out[name] = {"find": rate(m.find, hits), "insert": rate(m.add, news)}
        del m
    return out


def _dict_rates(
    keys: np.ndarray, hits: list[np.ndarray], news: list[np.ndarray], rate: Any
) -> dict[str, float]:
    d = dict(zip(keys.tolist(), range(len(keys)), strict=True))
    return {
        "find": rate(lambda b: torch.tensor([d.get(k, -1) for k in b.tolist()]), hits),
        "insert": rate(lambda b: d.update(zip(b.tolist(), range(len(b)), strict=True)), news),
    }


def _sorted_rates(
    keys: np.ndarray, hits: list[np.ndarray], news: list[np.ndarray], rate: Any
) -> dict[str, float]:
    sk = torch.from_numpy(np.sort(keys))

    def search(b: np.ndarray) -> None:
        t = torch.from_numpy(b)
        pos = torch.searchsorted(sk, t).clamp_(max=len(sk) - 1)
        torch.where(sk[pos] == t, pos, -1)

    # an insert keeps the keys sorted: a merge of the whole array per batch
    return {
        "find": rate(search, hits),
        "insert": rate(lambda b: torch.sort(torch.cat([sk, torch.from_numpy(b)])), news[:1]),
    }


def _in_child(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a fresh spawned process (a clean resident-memory baseline)."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _lookups(p: dict[str, Any]) -> str:
    read, train, ss = p["lookup read"] / 1e6, p["lookup train"] / 1e6, p["searchsorted"] / 1e6
    return f"read {read:.1f}M keys/s, train {train:.1f}M/s; searchsorted {ss:.1f}M/s"


def _split(med: dict[str, float], what: str, first: str, second: str, nbytes: int) -> str:
    total, a, b = med[what], med[f"{what} {first}"], med[f"{what} {second}"]
    return f"{total:.2f} s ({nbytes / total / 1e9:.2f} GB/s) = {first} {a:.2f} s + {second} {b:.2f} s"


# -- the report ------------------------------------------------------------------------------
def report(a: argparse.Namespace, prov: dict[str, Any], parts: dict[str, Any]) -> dict[str, Any]:
    scale, new, old = parts["scale"], parts["new"], parts["old"]
    med = {k: median(v) for k, v in scale["runs"].items()}
    nb = scale["dump_bytes"]
    write = {n: nb / med[f"write x{n}"] / 1e9 for n in (1, 2, 4, 8)}
    read = {n: nb / med[f"read x{n}"] / 1e9 for n in (1, 2, 4, 8)}
    wbest, rbest = max(write, key=lambda n: write[n]), max(read, key=lambda n: read[n])
    dump_gbps, load_gbps = nb / med["dump"] / 1e9, nb / med["load"] / 1e9
    rate = {p: part["rows"] / part["insert_s"] for p, part in (("scale", scale), ("new", new), ("old", old))}
    over = {
        p: part["rss_growth"] / part["row_bytes"]
        for p, part in (("scale", scale), ("new", new), ("old", old))
    }
    targets = [
        ("rows in one process", scale["rows"], ">=", 50e6),
        ("peak RSS / row bytes", over["scale"], "<=", 1.5),
        ("insert, rows/s", rate["scale"], ">=", 5e6),
        ("lookup of existing keys (read), keys/s", scale["lookup read"], ">=", 30e6),
        ("full dump / disk write ceiling", dump_gbps / write[wbest], ">=", 0.8),
        ("full load / disk read ceiling", load_gbps / read[rbest], ">=", 0.8),
        ("1% delta: full dump time / delta dump time", med["dump"] / med["delta dump"], ">=", 20.0),
    ]
    checked = [
        {"figure": f, "value": v, "target": f"{op} {t:g}", "met": bool(v >= t if op == ">=" else v <= t)}
        for f, v, op, t in targets
    ]
    ratios = {
        f"insert rows/s: new at {scale['rows']:,} / old at {old['rows']:,}": rate["scale"] / rate["old"],
        f"insert rows/s: new / old, both at {old['rows']:,}": rate["new"] / rate["old"],
        f"lookup read keys/s: new at {scale['rows']:,} / old at {old['rows']:,}": scale["lookup read"]
        / old["lookup read"],
        f"lookup read keys/s: new / old, both at {old['rows']:,}": new["lookup read"] / old["lookup read"],
        f"lookup train keys/s: new / old, both at {old['rows']:,}": new["lookup train"] / old["lookup train"],
        "RSS per row byte: old / new (same size)": over["old"] / over["new"],
        f"snapshot (export) time: old / new at {old['rows']:,}": old["export_s"] / new["export_s"],
        f"1% delta snapshot time: old / new at {old['rows']:,}": old["delta_export_s"]
        / new["delta_export_s"],
        f"lookup read / searchsorted at {scale['rows']:,}": scale["lookup read"] / scale["searchsorted"],
        f"lookup train / searchsorted at {scale['rows']:,}": scale["lookup train"] / scale["searchsorted"],
        f"lookup read / searchsorted at {new['rows']:,}": new["lookup read"] / new["searchsorted"],
        f"old lookup read / searchsorted at {old['rows']:,}": old["lookup read"] / old["searchsorted"],
    }
    doc = {
        "provenance": prov,
        "config": {k: getattr(a, k) for k in ("rows", "dim", "batch", "baseline_rows", "repeats")},
        "kernels": "C" if kernels() is not None else "NumPy",
        "targets": checked,
        "ratios": ratios,
        "disk": {
            "bytes": nb,
            "write_gbps_by_streams": write,
            "read_gbps_by_streams": read,
            "write_ceiling_gbps": write[wbest],
            "read_ceiling_gbps": read[rbest],
            "dump_gbps": dump_gbps,
            "load_gbps": load_gbps,
        },
        "medians_s": med,
        "parts": parts,
    }
    table = [
        (f"target: {c['figure']} ({c['target']})", f"{c['value']:,.3g} {_met(c['met'])}") for c in checked
    ]
    for k, p in (("scale", scale), ("new", new), ("old", old)):
        at = f"at {p['rows']:,} rows ({p['kind']})"
        table.append((f"insert {at}", f"{rate[k] / 1e6:.2f}M rows/s"))
        table.append((f"lookup of {a.batch:,} existing keys {at}", _lookups(p)))
        table.append(
            (f"peak RSS growth {at}", f"{human_bytes(p['rss_growth'])}: {over[k]:.2f}x the row bytes")
        )
    table += [(f"raw write, {n} stream(s)", f"{write[n]:.2f} GB/s") for n in write]
    table += [(f"raw cold read, {n} stream(s)", f"{read[n]:.2f} GB/s") for n in read]
    table.append((f"full dump of {human_bytes(nb)}", _split(med, "dump", "snapshot", "write", nb)))
    table.append(("full load (cold)", _split(med, "load", "read", "apply", nb)))
    delta = f"{med['delta dump']:.3f} s, {human_bytes(scale['delta_bytes'])}"
    table.append((f"delta dump, {scale['delta_rows']:,} rows touched", delta))
    table += [(f"ratio: {k}", f"{v:.2f}") for k, v in ratios.items()]
    for size, cands in parts["candidates"].items():
        for name, c in cands.items():
            table.append(
                (
                    f"candidate index at {size} keys: {name}",
                    f"find {c['find'] / 1e6:.1f}M/s, insert {c['insert'] / 1e6:.2f}M/s",
                )
            )
    table.append(("profile of 10 insert batches (own time)", "<br>".join(scale["profile"])))
    write_results(a.out, a.name, doc, table)
    return doc


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=50_000_000, help="rows of the scale run")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--batch", type=int, default=100_000, help="unique keys per lookup")
    p.add_argument("--baseline-rows", type=int, default=2_000_000, help="rows of the old-vs-new runs")
    p.add_argument("--candidate-rows", default="2000000,20000000", help="index sizes of the candidate runs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=None, help="where dumps are written (default: a temp dir)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--name", default="dynamic_table")
    a = p.parse_args(argv)
    if a.workdir:
        os.makedirs(a.workdir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="reckpt-dyn-", dir=a.workdir)
    try:
        require_free_space(work, int(2.2 * a.rows * (20 + 4 * a.dim)))
        prov = provenance(work)
        parts: dict[str, Any] = {"candidates": {}}
        for n in (int(x) for x in a.candidate_rows.split(",") if x):
            parts["candidates"][f"{n:,}"] = _in_child(part_candidates, n, a.batch, 3 * a.repeats)
        parts["old"] = _in_child(part_table, "old", a.baseline_rows, a.dim, a.batch, a.repeats)
        parts["new"] = _in_child(part_table, "new", a.baseline_rows, a.dim, a.batch, a.repeats)
        parts["scale"] = _in_child(part_scale, a.rows, a.dim, a.batch, a.repeats, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report(a, prov, parts)


if __name__ == "__main__":
    main()
