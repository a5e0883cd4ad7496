"""How save and restore times grow with the state's size (1, 4, 8 GB) and with processes (1, 2, 4).

``python -m benchmarks.scaling`` reads ``save_restore_<gb>gb_<p>p.json`` from the results
folder (written by ``python -m benchmarks``) and writes ``scaling.json``, ``.md`` and
``.png``. For every process count and figure (the disk's write and read ceilings, reckpt's
save and verified restore, and the baselines):

- the seconds at each size and a least-squares line ``seconds = a + b * GB``: ``b`` is the
  cost per GB, ``a`` the fixed cost, ``r2`` how straight the line is (1.0: cost linear in
  bytes);
- the scaling factor between the smallest and the largest size,
  ``(t_large / t_small) / (bytes_large / bytes_small)``: 1.0 is linear (constant
  throughput), above 1 worse than linear, below 1 better (fixed costs amortised);
- per size, the seconds per GB on 1, 2 and 4 processes and their spread (largest / smallest):
  flat per byte means adding processes neither helps nor hurts a disk-bound figure.

The figure has one panel of time against size per process count and one of seconds per GB
against processes at the largest size.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from benchmarks import ceiling
from benchmarks.common import provenance, write_results

__all__ = ["FIGURES", "PROCS", "SIZES", "fit", "load", "main", "scaling", "write"]

SIZES = (1, 4, 8)
PROCS = (1, 2, 4)
FIGURES = (
    "write ceiling",
    "reckpt save",
    "DCP save (thread_count=1)",
    "torch.save",
    "read ceiling",
    "reckpt restore (verified)",
    "DCP load (TorchEasyRec)",
    "torch.load",
)


def load(results: str) -> dict[tuple[int, int], dict[str, Any]]:
    """``(gb, procs) -> save_restore document`` for the result files of one commit.

    Figures measured at different commits do not belong on one line: when the files come
    from several, those of the commit with the most files are used.
    """
    found: dict[tuple[int, int], dict[str, Any]] = {}
    for gb in SIZES:
        for p in PROCS:
            path = os.path.join(results, f"save_restore_{gb}gb_{p}p.json")
            if os.path.exists(path):
                with open(path) as f:
                    found[(gb, p)] = json.load(f)
    revisions = [(d.get("provenance") or {}).get("git_revision") for d in found.values()]
    if not revisions:
        return found
    common = max(set(revisions), key=revisions.count)
    return {k: d for k, d in found.items() if (d.get("provenance") or {}).get("git_revision") == common}


def _seconds(doc: dict[str, Any]) -> dict[str, float]:
    """A document's median seconds, with the ceilings as figures of their own."""
    med = dict(doc["median_seconds"])
    for label, prefix in (("write ceiling", "raw write"), ("read ceiling", "raw read")):
        name = ceiling.best(med, prefix)
        if name is not None:
            med[label] = med[name]
    return med


def fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least squares ``y = a + b x``: ``{"s_per_gb": b, "fixed_s": a, "r2": ...}``."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    return {"s_per_gb": b, "fixed_s": a, "r2": 1.0 - ss_res / ss_tot if ss_tot else 1.0}


def scaling(results: str, procs: tuple[int, ...] = PROCS) -> dict[str, Any]:
    """Per process count, per figure: seconds by size, the line fit and the scaling factor."""
    docs = load(results)
    out: dict[str, Any] = {}
    for p in procs:
        sizes = sorted(gb for gb, q in docs if q == p)
        if len(sizes) < 2:
            continue
        meds = {gb: _seconds(docs[(gb, p)]) for gb in sizes}
        nbytes = {gb: docs[(gb, p)]["state_bytes"] for gb in sizes}
        small, large = sizes[0], sizes[-1]
        rows: dict[str, Any] = {}
        for figure in meds[small]:
            have = [gb for gb in sizes if figure in meds[gb] and meds[gb][figure] > 0]
            if small not in have or large not in have:
                continue
            xs = [nbytes[gb] / 1e9 for gb in have]
            ys = [meds[gb][figure] for gb in have]
            rows[figure] = {
                "gb": xs,
                "seconds": ys,
                "seconds_per_gb": [y / x for x, y in zip(xs, ys, strict=True)],
                "fit": fit(xs, ys),
                "scaling": (meds[large][figure] / meds[small][figure]) / (nbytes[large] / nbytes[small]),
            }
        out[f"{p}p"] = {"sizes_gb": sizes, "bytes": [nbytes[gb] for gb in sizes], "figures": rows}
    return out


def per_byte_by_procs(results: str) -> dict[str, Any]:
    """Per size: seconds per GB of every figure on each process count, and their spread."""
    docs = load(results)
    out: dict[str, Any] = {}
    for gb in SIZES:
        procs = sorted(p for g, p in docs if g == gb)
        if len(procs) < 2:
            continue
        per = {p: _seconds(docs[(gb, p)]) for p in procs}
        rows = {}
        for figure in per[procs[0]]:
            values = {
                f"{p}p": per[p][figure] / (docs[(gb, p)]["state_bytes"] / 1e9)
                for p in procs
                if figure in per[p]
            }
            if len(values) == len(procs):
                rows[figure] = {
                    "seconds_per_gb": values,
                    "spread": max(values.values()) / min(values.values()),
                }
        out[f"{gb}gb"] = rows
    return out


def _plot(path: str, by_procs: dict[str, Any], by_size: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(by_procs) + (1 if by_size else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.8), dpi=100, squeeze=False)
    for ax, (procs, section) in zip(axes[0], by_procs.items(), strict=False):
        for i, figure in enumerate(f for f in FIGURES if f in section["figures"]):
            row = section["figures"][figure]
            style = "--" if "ceiling" in figure else "-"
            ax.plot(row["gb"], row["seconds"], style, marker="o", color=f"C{i}", label=figure)
        ax.set_xlabel("state (GB)")
        ax.set_ylabel("seconds (lower is better)")
        ax.set_title(f"{procs}: time against size")
        ax.grid(alpha=0.3)
    if by_size:
        ax = axes[0][-1]
        size, rows = list(by_size.items())[-1]
        for i, figure in enumerate(f for f in FIGURES if f in rows):
            values = rows[figure]["seconds_per_gb"]
            xs = [int(k.removesuffix("p")) for k in values]
            style = "--" if "ceiling" in figure else "-"
            ax.plot(xs, list(values.values()), style, marker="o", color=f"C{i}", label=figure)
        ax.set_xticks([int(p) for p in PROCS])
        ax.set_xlabel("processes")
        ax.set_ylabel("seconds per GB (lower is better)")
        ax.set_title(f"{size}: cost per byte against processes")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle("save / restore: time against size and processes (medians)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--out", default=None, help="where to write (default: --results)")
    a = p.parse_args(argv)
    doc = write(a.results, a.out or a.results)
    if doc is None:
        raise SystemExit(f"{a.results}: no save_restore results at two sizes; run python -m benchmarks")
    return doc


def write(results: str, out: str) -> dict[str, Any] | None:
    """Write ``scaling.{json,md,png}`` into ``out`` from the results in ``results``.

    Returns:
        The document written, or None when ``results`` has no process count measured at
        two sizes or more.
    """
    found = scaling(results)
    if not found:
        return None
    by_size = per_byte_by_procs(results)
    measured = {(d.get("provenance") or {}).get("git_revision") for d in load(results).values()}
    doc = {
        "provenance": provenance(results),
        "measured_at": sorted(str(r) for r in measured),
        "definition": {
            "fit": "least squares seconds = fixed_s + s_per_gb * GB over the sizes measured",
            "scaling": "(t_large / t_small) / (bytes_large / bytes_small): 1.0 = linear",
            "spread": "per size: largest / smallest seconds per GB over the process counts",
        },
        "by_procs": found,
        "per_byte_by_procs": by_size,
    }
    table: list[tuple[str, str]] = []
    for procs, section in found.items():
        for figure, row in section["figures"].items():
            times = ", ".join(f"{x:.2f} GB {y:.2f} s" for x, y in zip(row["gb"], row["seconds"], strict=True))
            f = row["fit"]
            table.append(
                (
                    f"{procs}: {figure}",
                    f"{times}; {f['s_per_gb']:.3f} s/GB + {f['fixed_s']:.3f} s (r2 {f['r2']:.3f});"
                    f" scaling {row['scaling']:.2f}",
                )
            )
    for size, rows in by_size.items():
        for figure, row in rows.items():
            per = ", ".join(f"{k} {v:.3f}" for k, v in row["seconds_per_gb"].items())
            table.append((f"{size}: {figure}, s/GB by processes", f"{per}; spread {row['spread']:.2f}"))
    write_results(out, "scaling", doc, table)
    _plot(os.path.join(out, "scaling.png"), found, by_size)
    with open(os.path.join(out, "scaling.md"), "a") as f:
        f.write("\n![scaling](scaling.png)\n")
    for name, value in table:
        print(f"{name}: {value}")
    return doc


if __name__ == "__main__":
    main()
