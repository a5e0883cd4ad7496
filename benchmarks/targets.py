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
        op: ``">="``, ``">"`` or ``"<="``.
        threshold: the bound.
        ceiling: the ratio compares with the disk's ceiling, so a value above 1.0 is a
            measurement error (nothing beats the raw disk), reported as such, not as a pass.
    """

    module: str
    figure: str
    sections: tuple[tuple[str, ...], ...]
    key: str
    op: str
    threshold: float
    ceiling: bool = False

    @property
    def text(self) -> str:
        """The target as written in the summary, e.g. ``>= 0.8``."""
        return f"{self.op} {self.threshold:g}"

    def met(self, value: float) -> bool:
        """Whether ``value`` meets the target."""
        if self.op == ">=":
            return value >= self.threshold
        if self.op == ">":
            return value > self.threshold
        return value <= self.threshold


MEASUREMENT_ERROR = "measurement error"
NOT_RUN = "not run"
STATUSES = ("pass", "fail", MEASUREMENT_ERROR, "not measured", "missing", "error", NOT_RUN)
_R = (("ratios",),)

TARGETS = (
    Target("save_restore", "save throughput / write ceiling", _R, "save / write ceiling", ">=", 0.9, True),
    Target(
        "save_restore",
        "verified restore throughput / read ceiling",
        _R,
        "restore verified / read ceiling",
        ">=",
        0.9,
        True,
    ),
    Target("save_restore", "save faster than plain DCP (TorchEasyRec)", _R, "save / DCP default", ">", 1.0),
    Target("save_restore", "save faster than torch.save", _R, "save / torch.save", ">", 1.0),
    Target(
        "save_restore",
        "verified restore faster than plain DCP load",
        _R,
        "restore verified / DCP load",
        ">",
        1.0,
    ),
    Target(
        "save_restore",
        "verified restore faster than torch.load",
        _R,
        "restore verified / torch.load",
        ">",
        1.0,
    ),
    Target(
        "save_restore",
        "checksum cost A/B: save with / without checksums - 1",
        _R,
        "checksum cost A/B",
        "<=",
        0.03,
    ),
    Target(
        "save_restore",
        "verify cost A/B: verified / unverified restore - 1",
        _R,
        "verify cost A/B",
        "<=",
        0.03,
    ),
    Target("save_restore", "save throughput / best plain DCP", _R, "save / best plain DCP", ">=", 0.95),
    Target(
        "save_restore", "save throughput / raw write (1 stream)", _R, "save / raw write, 1 stream", ">=", 0.8
    ),
    Target(
        "save_restore",
        "verified restore throughput / raw read (1 stream)",
        _R,
        "restore verified / raw read, 1 stream",
        ">=",
        0.8,
    ),
    Target(
        "save_restore",
        "checksum cost (hashing not hidden by I/O) / save time",
        _R,
        "checksum cost: hashing not hidden",
        "<=",
        0.05,
    ),
    Target(
        "save_restore", "peak extra RSS during save / state", _R, "peak extra RSS during save", "<=", 0.25
    ),
    Target(
        "async_stall",
        "async stall (copy, default) / sync save",
        ((), ("figures",)),
        "stall_over_sync",
        "<=",
        0.05,
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
        _R,
        "restore 2 -> 1 / restore 1 -> 1",
        "<=",
        1.3,
    ),
    Target("delta", "full bytes / delta bytes at 5% rows", (("targets_at_5pct",),), "bytes_ratio", ">=", 15),
    Target("delta", "full save s / delta save s at 5% rows", (("targets_at_5pct",),), "speedup", ">=", 5),
    Target(
        "unsharded_load",
        "load_unsharded peak extra RSS / bound (largest table + dense + 64 MB)",
        (("target_ratios",),),
        "load_unsharded extra RSS / bound",
        "<=",
        1.0,
    ),
    Target("reliability", "checkpoints lost", (("summary",),), "checkpoints_lost", "<=", 0),
    Target("reliability", "failed checks", (("summary",),), "failures", "<=", 0),
    Target("tiers", "memory-tier save blocking / sync save", _R, "blocking: memory tier (copy)", "<=", 0.05),
    Target("tiers", "restart: cold local disk / memory", _R, "restart: cold local disk", ">=", 5),
    Target("tiers", "steps lost per failure (memory every 50)", _R, "steps lost per failure", "<=", 50),
    Target("tiers", "training throughput: tiers on / off", _R, "throughput: tiers on / off", ">=", 0.97),
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


def _not_measured(docs: Sequence[Mapping[str, Any]], key: str) -> str | None:
    """Why a ratio is absent, when the benchmark said so (``ratios_not_measured``)."""
    for doc in docs:
        reasons = doc.get("ratios_not_measured")
        if isinstance(reasons, Mapping):
            found = next((k for k in reasons if str(k).startswith(key)), None)
            if found is not None:
                return str(reasons[found])
    return None


def _declared(name: str, docs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows for the targets a benchmark declares itself: ``targets`` as a list of
    ``{"figure", "value", "target", "met"}`` (``dynamic_table`` does)."""
    for doc in docs:
        declared = doc.get("targets")
        if not isinstance(declared, list):
            continue
        rows = []
        for t in declared:
            if not isinstance(t, Mapping) or "figure" not in t or "target" not in t:
                continue
            value = t.get("value")
            ratio = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
            met = t.get("met")
            op, _, bound = str(t["target"]).partition(" ")
            try:
                threshold = float(bound)
            except ValueError:
                threshold = math.nan
            rows.append(
                {
                    "benchmark": name,
                    "figure": str(t["figure"]),
                    "key": str(t["figure"]),
                    "ratio": ratio,
                    "target": f"{op} {bound}".strip(),
                    "threshold": threshold,
                    "pass": met if isinstance(met, bool) else None,
                    "status": "missing" if not isinstance(met, bool) else "pass" if met else "fail",
                }
            )
        return rows
    return []


def evaluate(
    name: str, module: str, docs: Sequence[Mapping[str, Any]], error: str | None
) -> list[dict[str, Any]]:
    """The summary rows of one benchmark run: one per target of its module, then its own.

    Args:
        name: the run's name (``save_restore_1gb_2p``).
        module: its module (``save_restore``).
        docs: where to read the ratios, in order (the returned dict, then the JSON file).
        error: the run's error, when it failed (every row is then ``error``).

    Returns:
        Rows with ``benchmark``, ``figure``, ``key``, ``ratio``, ``target``, ``threshold``,
        ``pass`` (None when not measured or not believable) and ``status``: ``pass``,
        ``fail``, ``measurement error`` (a ratio above 1.0 against a ceiling), ``not
        measured`` (the benchmark skipped it and said why, in ``note``), ``missing`` or
        ``error``. Targets a benchmark declares itself (a ``targets`` list) follow.
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
            if t.ceiling and hit[1] > 1.0:
                row.update(status=MEASUREMENT_ERROR, note="above 1.0 against the disk's ceiling")
            else:
                ok = t.met(hit[1])
                row.update({"pass": ok, "status": "pass" if ok else "fail"})
        elif error is None and (why := _not_measured(docs, t.key)) is not None:
            row.update(status="not measured", note=why)
        rows.append(row)
    if error is None:
        rows += _declared(name, docs)
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
        f"{counts['pass']} targets met, {counts['fail']} missed,"
        f" {counts.get(MEASUREMENT_ERROR, 0)} measurement errors (a ratio above 1.0 against the"
        f" disk's ceiling: not a result), {counts.get('not measured', 0)} not measured (skipped,"
        f" reason given), {counts['missing']} missing, {counts['error']} not measured (benchmark"
        f" failed), {counts.get(NOT_RUN, 0)} not run (no results file);"
        f" {len(doc['errors'])} benchmark(s) failed.",
        "",
        "| benchmark | figure | ratio | target | result | measured at |",
        "|---|---|---:|---|---|---|",
    ]
    for r in doc["targets"]:
        status = r["status"] + (f" ({r['note']})" if r.get("note") else "")
        at = r.get("revision") or "-"
        lines.append(
            f"| {r['benchmark']} | {r['figure']} | {_cell(r['ratio'])} | {r['target']} | {status} | {at} |"
        )
    lines += [
        "",
        "Results of runs not run by this command (status `earlier`) come from their results files,",
        "measured at the commit shown; `not run` means there is no results file.",
        "",
        "| benchmark | status | wall time | measured at | results |",
        "|---|---|---:|---|---|",
    ]
    for b in doc["benchmarks"]:
        files = " ".join(f"[{os.path.splitext(f)[1][1:]}]({f})" for f in b["files"])
        at = b.get("revision") or "-"
        lines.append(f"| {b['name']} | {b['status']} | {b['wall_s']:.1f} s | {at} | {files} |")
    for b in doc["benchmarks"]:
        if b["status"] == "error":
            lines += ["", f"## {b['name']} failed", "", f"`{' '.join(b['command'])}`", "", "```"]
            lines += [b["error"], *b.get("log_tail", []), "```"]
    if doc.get("chart"):
        lines += ["", f"![{SUMMARY}]({doc['chart']})"]
    return "\n".join(lines) + "\n"


def _margin(row: Mapping[str, Any]) -> float:
    """How far a ratio is on the good side of its target: >= 1 meets it (capped at 10)."""
    ratio, threshold = row["ratio"], row["threshold"]
    if row["target"].startswith(">"):
        score = ratio / threshold
    else:
        score = threshold / ratio if ratio > 0 else math.inf
    return float(min(score, 10.0))


def chart(path: str, rows: Sequence[Mapping[str, Any]]) -> bool:
    """Write the summary's PNG: every measured ratio over its target; False when none can be drawn.

    Targets whose threshold is 0 (counts that must be 0) have no ratio to draw and are left
    out, and so are measurement errors (no result to draw).
    """
    values = {
        f"{'pass' if r['pass'] else 'FAIL'} | {r['benchmark']}: {r['figure']}": _margin(r)
        for r in rows
        if r["ratio"] is not None
        and r["pass"] is not None
        and r["threshold"] > 0
        and r["target"][:1] in "<>"
        and not math.isnan(r["threshold"])
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
