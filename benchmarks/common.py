"""Shared helpers for benchmarks: provenance, free-space check, JSON + markdown + PNG output."""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_revision(root: str = REPO_ROOT) -> str:
    """The short commit of the repository at ``root``, ``-dirty`` when its tree differs from it.

    Asked of the benchmarks' own repository whatever the current directory. The tree is
    dirty when a tracked file changed or an untracked file that git does not ignore exists
    (a new module the results may depend on). ``unknown`` outside git.
    """
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=normal"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(workdir: str) -> dict[str, Any]:
    """Where and how a result was measured: command, commit, host, platform, CPUs, free disk, time."""
    return {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "git_revision": git_revision(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "workdir": workdir,
        "disk_free_gb": round(shutil.disk_usage(workdir).free / 1e9, 1),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def stamp_revision(path: str, revision: str) -> bool:
    """Make a results file carry the commit it was measured at; whether it had to be added.

    A JSON document without ``provenance.git_revision`` gains it; a markdown file that does
    not mention the commit gains a line under its title. Other files are left alone.
    """
    if path.endswith(".json"):
        with open(path) as f:
            doc = json.load(f)
        prov = doc.get("provenance") if isinstance(doc, dict) else None
        if not isinstance(doc, dict) or (isinstance(prov, dict) and prov.get("git_revision")):
            return False
        doc["provenance"] = {**(prov if isinstance(prov, dict) else {}), "git_revision": revision}
        with open(path, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        return True
    if path.endswith(".md"):
        with open(path) as f:
            lines = f.read().splitlines()
        if any(revision.removesuffix("-dirty") in line for line in lines):
            return False
        at = 1 if lines and lines[0].startswith("# ") else 0
        lines[at:at] = ["", f"measured at {revision} (stamped by the suite)"]
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return True
    return False


def require_free_space(path: str, needed_bytes: int) -> None:
    """Exit (``SystemExit``) with a message when ``path``'s file system has under ``needed_bytes`` free."""
    free = shutil.disk_usage(path).free
    if free < needed_bytes:
        raise SystemExit(f"{path}: {free / 1e9:.1f} GB free, the benchmark needs {needed_bytes / 1e9:.1f} GB")


def drop_cache(path: str) -> None:
    """fsync and evict every file under ``path`` from the page cache."""
    files = [path] if os.path.isfile(path) else [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs]
    for name in files:
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def status_bytes(field: str, pid: str = "self") -> int:
    """A size field of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``) in bytes; 0 when absent."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak_rss() -> None:
    """Reset this process's peak resident size (``VmHWM``) to its current size, where Linux allows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def memory_available() -> int:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (0 when unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def children_private_bytes() -> int:
    """Memory held only by this process's children (``Private_*`` of their ``smaps_rollup``).

    A forked child shares the parent's pages copy-on-write: its resident size counts them,
    its private bytes only what it copied or allocated itself.
    """
    total = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids = f.read().split()
        except OSError:
            continue
        for pid in pids:
            try:
                with open(f"/proc/{pid}/smaps_rollup") as f:
                    for line in f:
                        if line.startswith(("Private_Clean:", "Private_Dirty:")):
                            total += int(line.split()[1]) << 10
            except OSError:
                pass
    return total


def timed(fn: Callable[[], Any]) -> float:
    """Seconds ``fn()`` took."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    """The median of ``values``, as a float."""
    return float(statistics.median(values))


@dataclass(frozen=True)
class Chart:
    """One panel of horizontal bars, one bar per entry of ``values`` (top to bottom in order).

    Attributes:
        values: label -> bar length.
        xlabel: the axis label, with the unit and which way is better.
        title: the panel's own title (empty: none).
        highlight: labels starting with this prefix (or any of these prefixes) are reckpt's
            figures, drawn in C3.
        reference: labels starting with this prefix (or any of these) are the reference
            baseline (e.g. the disk's raw speed), drawn in C7; every other bar is C0.
        target: draw a dashed vertical line at this value (None: no line).
        target_label: the legend text of that line.
    """

    values: Mapping[str, float]
    xlabel: str
    title: str = ""
    highlight: str | tuple[str, ...] = "reckpt"
    reference: str | tuple[str, ...] = "raw"
    target: float | None = None
    target_label: str = "target"


def write_charts(path: str, title: str, charts: Sequence[Chart]) -> str:
    """Write the panels, stacked top to bottom, as one PNG (matplotlib's Agg backend).

    Args:
        path: the ``.png`` to write (its folder must exist).
        title: the figure's title.
        charts: the panels; each panel's height follows its number of bars.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heights = [max(2, len(c.values)) for c in charts]
    fig, axes = plt.subplots(
        len(charts),
        1,
        figsize=(9, 1.2 + sum(0.35 * h + 0.6 for h in heights)),
        dpi=100,
        height_ratios=heights,
        squeeze=False,
    )
    for ax, chart in zip(axes[:, 0], charts, strict=True):
        names = list(chart.values)
        colors = [
            "C3" if k.startswith(chart.highlight) else "C7" if k.startswith(chart.reference) else "C0"
            for k in names
        ]
        bars = ax.barh(names, [float(chart.values[k]) for k in names], color=colors)
        ax.bar_label(bars, fmt="%.3g", padding=2, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(chart.xlabel)
        ax.margins(x=0.12)
        if not any(chart.values.values()):
            ax.set_xlim(0, 1)
        if chart.title:
            ax.set_title(chart.title, fontsize=10)
        if chart.target is not None:
            ax.axvline(chart.target, color="k", linestyle="--", linewidth=1, label=chart.target_label)
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_chart(
    path: str,
    title: str,
    values: Mapping[str, float],
    xlabel: str,
    highlight: str | tuple[str, ...] = "reckpt",
    reference: str | tuple[str, ...] = "raw",
    target: float | None = None,
) -> str:
    """Write one horizontal bar chart as a PNG: reckpt's bars in C3, baselines in C0 and C7.

    Example: ``write_chart("out/save_restore.png", "save / restore of 1.07 GB", gbps,
    "GB/s (higher is better)")`` draws every ``reckpt ...`` label in C3, every ``raw ...``
    label in C7 and the other baselines in C0.

    Args:
        path: the ``.png`` to write (its folder must exist).
        title: the chart's title.
        values: label -> bar length, drawn top to bottom in this order.
        xlabel: the axis label, with the unit and which way is better.
        highlight: the prefix (or prefixes) of the labels drawn in C3.
        reference: the prefix (or prefixes) of the labels drawn in C7.
        target: draw a dashed vertical line at this value (None: no line).

    Returns:
        ``path``.
    """
    return write_charts(path, title, [Chart(values, xlabel, "", highlight, reference, target)])


def human_bytes(n: float) -> str:
    """``n`` bytes as ``"1.07 GB"`` or ``"2.1 MB"`` (decimal units)."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def write_results(
    out_dir: str,
    name: str,
    doc: dict[str, Any],
    table: list[tuple[str, str]],
    chart: Chart | Sequence[Chart] | None = None,
    chart_title: str | None = None,
) -> tuple[str, str]:
    """Write ``<name>.json`` and ``<name>.md`` (a two-column table) into ``out_dir``.

    Args:
        out_dir: the results folder (created when missing).
        name: the files' base name.
        doc: the JSON document; ``doc["provenance"]`` (see :func:`provenance`) heads the markdown.
        table: the markdown table's rows, (figure, value).
        chart: when given, also write ``<name>.png`` with these panels (:func:`write_charts`).
        chart_title: the PNG's title (default: ``name``).

    Returns:
        The paths of the JSON and markdown files (the PNG, when written, is ``<name>.png``).
    """
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"{name}.json")
    md_path = os.path.join(out_dir, f"{name}.md")
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    lines = [f"# {name}", "", f"`{doc['provenance']['command']}` at {doc['provenance']['git_revision']}", ""]
    lines += ["| figure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in table]
    if chart is not None:
        charts = [chart] if isinstance(chart, Chart) else list(chart)
        write_charts(os.path.join(out_dir, f"{name}.png"), chart_title or name, charts)
        lines += ["", f"![{name}]({name}.png)"]
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return json_path, md_path
