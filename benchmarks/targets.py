"""The targets the benchmark suite checks, and its summary (``summary.json``, ``.md``, ``.png``).

Each target reads one ratio from a benchmark's result (the dict its ``main`` returned, else
its ``<name>.json``). Keys are matched exactly first, then by prefix, so a key that gains a
suffix (``"save / raw write (target >= 0.8)"``) still matches; a key that is absent makes
the row ``missing`` rather than an error.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.common import Chart, write_charts

SUMMARY = "summary"


@dataclass(frozen=True)
class Target:
    """One target: ``ratio <op> threshold`` for every run of ``module``.

    Attributes:
        module: the benchmark module the ratio comes from (``save_restore``, ``delta``, ...).
        figure: what is measured, in words.
        sections: where the key may be, tried in order: each a path of keys into the result
            (``()``: the result itself).
        key: the ratio's key, or the start of it.
        op: ``">="`` or ``"<="``.
        threshold: the bound.
    """

    module: str
    figure: str
    sections: tuple[tuple[str, ...], ...]
    key: str
    op: str
    threshold: float

    @property
    def text(self) -> str:
        """The target as written in the summary, e.g. ``>= 0.8``."""
        return f"{self.op} {self.threshold:g}"


TARGETS = (
    Target("save_restore", "save throughput / raw write", (("ratios",),), "save / raw write", ">=", 0.8),
    Target(
        "save_restore",
        "save throughput / best plain DCP",
        (("ratios",),),
        "save / best plain DCP",
        ">=",
        0.95,
    ),
    Target(
        "save_restore",
        "verified restore throughput / raw read",
        (("ratios",),),
        "restore verified / raw read",
        ">=",
        0.8,
    ),
    Target(
        "save_restore",
        "checksum cost (hashing not hidden by I/O) / save time",
        (("ratios",),),
        "checksum cost",
        "<=",
        0.05,
    ),
    Target(
        "save_restore", "peak extra RSS during save / state", (("ratios",),), "peak extra RSS", "<=", 0.25
    ),
    Target(
        "async_stall",
        "async stall (copy, default) / sync save",
        ((), ("figures",)),
        "stall_over_sync",
        "<=",
        0.10,
    ),
    Target(
        "async_stall",
        "async stall (fork) / sync save",
        ((), ("figures",)),
        "fork_stall_over_sync",
        "<=",
        0.10,
    ),
    Target(
        "reshard_load",
        "2 -> 1 restore / same-world-size restore",
        (("ratios",),),
        "restore 2 -> 1 / restore 1 -> 1",
        "<=",
        1.3,
    ),
    Target("delta", "full bytes / delta bytes at 5% rows", (("targets_at_5pct",),), "bytes_ratio", ">=", 15),
    Target("delta", "full save s / delta save s at 5% rows", (("targets_at_5pct",),), "speedup", ">=", 5),
    Target("reliability", "checkpoints lost", (("summary",),), "checkpoints_lost", "<=", 0),
    Target("reliability", "failed checks", (("summary",),), "failures", "<=", 0),
)


def lookup(doc: Mapping[str, Any], sections: Sequence[Sequence[str]], key: str) -> tuple[str, float] | None:
    """The (key, value) a target reads from ``doc``, or None when absent or not a number.

    Args:
        doc: a benchmark's result.
        sections: paths of keys into ``doc`` to search, in order.
        key: the exact key, or the start of it.

    Returns:
        The key found and its value as a float.
    """
    for path in sections:
        section: Any = doc
        for part in path:
            section = section.get(part) if isinstance(section, Mapping) else None
        if not isinstance(section, Mapping):
            continue
        found = key if key in section else next((k for k in section if str(k).startswith(key)), None)
        value = section.get(found) if found is not None else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(found), float(value)
    return None


def evaluate(
    name: str, module: str, docs: Sequence[Mapping[str, Any]], error: str | None
) -> list[dict[str, Any]]:
    """The summary rows of one benchmark run: one per target of its module.

    Args:
        name: the run's name (``save_restore_1gb_2p``).
        module: its module (``save_restore``).
        docs: where to read the ratios, in order (the returned dict, then the JSON file).
        error: the run's error, when it failed (every row is then ``error``).

    Returns:
        Rows with ``benchmark``, ``figure``, ``key``, ``ratio``, ``target``, ``threshold``,
        ``pass`` (None when not measured) and ``status`` (pass, fail, missing or error).
    """
    rows = []
    for t in (t for t in TARGETS if t.module == module):
        hit = None if error else next((h for d in docs if (h := lookup(d, t.sections, t.key))), None)
        row: dict[str, Any] = {
            "benchmark": name,
            "figure": t.figure,
            "key": hit[0] if hit else None,
            "ratio": hit[1] if hit else None,
            "target": t.text,
            "threshold": t.threshold,
            "pass": None,
            "status": "error" if error else "missing",
        }
        if hit is not None:
            ok = hit[1] >= t.threshold if t.op == ">=" else hit[1] <= t.threshold
            row.update({"pass": ok, "status": "pass" if ok else "fail"})
        rows.append(row)
    return rows


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def markdown(doc: Mapping[str, Any]) -> str:
    """The summary as markdown: targets, then the runs (status, wall time, files), then errors."""
    prov, counts = doc["provenance"], doc["counts"]
    lines = [
        f"# benchmark suite ({doc['size']})",
        "",
        f"`{prov['command']}` at {prov['git_revision']} on {prov['host']} ({prov['cpus']} CPUs),"
        f" {prov['time']}, {doc['wall_s']:.0f} s in all",
        "",
        f"{counts['pass']} targets met, {counts['fail']} missed, {counts['missing']} missing,"
        f" {counts['error']} not measured (benchmark failed); {len(doc['errors'])} benchmark(s) failed.",
        "",
        "| benchmark | figure | ratio | target | result |",
        "|---|---|---:|---|---|",
    ]
    for r in doc["targets"]:
        lines.append(
            f"| {r['benchmark']} | {r['figure']} | {_cell(r['ratio'])} | {r['target']} | {r['status']} |"
        )
    lines += ["", "| benchmark | status | wall time | results |", "|---|---|---:|---|"]
    for b in doc["benchmarks"]:
        files = " ".join(f"[{os.path.splitext(f)[1][1:]}]({f})" for f in b["files"])
        lines.append(f"| {b['name']} | {b['status']} | {b['wall_s']:.1f} s | {files} |")
    for b in doc["benchmarks"]:
        if b["status"] != "ok":
            lines += ["", f"## {b['name']} failed", "", f"`{' '.join(b['command'])}`", "", "```"]
            lines += [b["error"], *b.get("log_tail", []), "```"]
    if doc.get("chart"):
        lines += ["", f"![{SUMMARY}]({doc['chart']})"]
    return "\n".join(lines) + "\n"


def _margin(row: Mapping[str, Any]) -> float:
    """How far a ratio is on the good side of its target: >= 1 meets it (capped at 10)."""
    ratio, threshold = row["ratio"], row["threshold"]
    if row["target"].startswith(">="):
        score = ratio / threshold
    else:
        score = threshold / ratio if ratio > 0 else math.inf
    return float(min(score, 10.0))


def chart(path: str, rows: Sequence[Mapping[str, Any]]) -> bool:
    """Write the summary's PNG: every measured ratio over its target; False when none can be drawn.

    Targets whose threshold is 0 (counts that must be 0) have no ratio to draw and are left out.
    """
    values = {
        f"{'pass' if r['pass'] else 'FAIL'} | {r['benchmark']}: {r['figure']}": _margin(r)
        for r in rows
        if r["ratio"] is not None and r["threshold"] > 0
    }
    if not values:
        return False
    write_charts(
        path,
        "benchmark targets: measured / target, oriented so that >= 1 meets it (capped at 10)",
        [Chart(values, "x of the target (higher is better)", highlight="FAIL", reference=(), target=1.0)],
    )
    return True


def write_summary(out_dir: str, doc: dict[str, Any]) -> str:
    """Write ``summary.json``, ``summary.md`` and (when there is a ratio to draw) ``summary.png``.

    Args:
        out_dir: the results folder.
        doc: the summary (see :func:`benchmarks.suite.run_suite`); gains ``chart``.

    Returns:
        The path of ``summary.json``.
    """
    os.makedirs(out_dir, exist_ok=True)
    png = f"{SUMMARY}.png"
    doc["chart"] = png if chart(os.path.join(out_dir, png), doc["targets"]) else None
    json_path = os.path.join(out_dir, f"{SUMMARY}.json")
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, f"{SUMMARY}.md"), "w") as f:
        f.write(markdown(doc))
    return json_path
