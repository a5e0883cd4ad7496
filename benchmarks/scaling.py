"""How save and restore figures scale from about 1 GB to about 4 GB of state.

``python -m benchmarks.scaling`` reads ``save_restore_1gb_<p>p.json`` and
``save_restore_4gb_<p>p.json`` from the results folder (written by ``python -m benchmarks``)
and writes ``scaling.json``, ``.md`` and ``.png``: for every figure and process count, the
seconds at both sizes and the scaling factor ``(t_4 / t_1) / (bytes_4 / bytes_1)``: 1.0 is
linear (constant throughput), above 1 is worse than linear, below 1 better (fixed costs
amortised).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from benchmarks.common import Chart, provenance, write_results

__all__ = ["scaling", "main", "write"]


def scaling(results: str, procs: tuple[int, ...] = (1, 2)) -> dict[str, Any]:
    """Per process count: figure -> seconds at 1 and 4 GB and the scaling factor (pure reading)."""
    out: dict[str, Any] = {}
    for p in procs:
        paths = [os.path.join(results, f"save_restore_{gb}gb_{p}p.json") for gb in (1, 4)]
        if not all(os.path.exists(x) for x in paths):
            continue
        small, large = (json.load(open(x)) for x in paths)  # noqa: SIM115
        grow = large["state_bytes"] / small["state_bytes"]
        rows = {}
        for figure, t1 in small["median_seconds"].items():
            t4 = large["median_seconds"].get(figure)
            if t4 is None or t1 <= 0:
                continue
            rows[figure] = {
                "seconds_1gb": t1,
                "seconds_4gb": t4,
                "gb_per_s_1gb": small["gb_per_s"][figure],
                "gb_per_s_4gb": large["gb_per_s"][figure],
                "scaling": (t4 / t1) / grow,
            }
        ratios = {
            k: {"1gb": small["ratios"][k], "4gb": large["ratios"].get(k)} for k in small.get("ratios", {})
        }
        out[f"{p}p"] = {
            "bytes_1gb": small["state_bytes"],
            "bytes_4gb": large["state_bytes"],
            "figures": rows,
            "ratios": ratios,
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--out", default=None, help="where to write (default: --results)")
    a = p.parse_args(argv)
    doc = write(a.results, a.out or a.results)
    if doc is None:
        raise SystemExit(f"{a.results}: no save_restore 1 GB and 4 GB results; run python -m benchmarks")
    return doc


def write(results: str, out: str) -> dict[str, Any] | None:
    """Write ``scaling.{json,md,png}`` into ``out`` from the results in ``results``.

    Returns:
        The document written, or None when ``results`` lacks a 1 GB / 4 GB pair.
    """
    found = scaling(results)
    if not found:
        return None
    doc = {
        "provenance": provenance(results),
        "definition": "(t_4GB / t_1GB) / (bytes_4GB / bytes_1GB): 1.0 = linear",
        "by_procs": found,
    }
    table: list[tuple[str, str]] = []
    charts = []
    for procs, section in found.items():
        for figure, row in section["figures"].items():
            table.append(
                (
                    f"{procs}: {figure}",
                    f"{row['seconds_1gb']:.3f} s -> {row['seconds_4gb']:.3f} s,"
                    f" {row['gb_per_s_1gb']:.2f} -> {row['gb_per_s_4gb']:.2f} GB/s,"
                    f" scaling {row['scaling']:.2f}",
                )
            )
        values = {f: r["scaling"] for f, r in section["figures"].items()}
        charts.append(
            Chart(values, "scaling 1 GB -> 4 GB (1.0 = linear; lower is better)", procs, target=1.0)
        )
    write_results(out, "scaling", doc, table, chart=charts, chart_title="save / restore: 1 GB -> 4 GB")
    for name, value in table:
        print(f"{name}: {value}")
    return doc


if __name__ == "__main__":
    main()
