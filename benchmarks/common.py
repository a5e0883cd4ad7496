"""Shared helpers for benchmarks: provenance, free-space check, JSON + markdown output."""

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
from collections.abc import Callable
from typing import Any


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(workdir: str) -> dict[str, Any]:
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


def require_free_space(path: str, needed_bytes: int) -> None:
    free = shutil.disk_usage(path).free
    if free < needed_bytes:
        raise SystemExit(f"{path}: {free / 1e9:.1f} GB free, the benchmark needs {needed_bytes / 1e9:.1f} GB")


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def write_results(
    out_dir: str, name: str, doc: dict[str, Any], table: list[tuple[str, str]]
) -> tuple[str, str]:
    """Write ``<name>.json`` and ``<name>.md`` (a two-column table) into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"{name}.json")
    md_path = os.path.join(out_dir, f"{name}.md")
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    lines = [f"# {name}", "", f"`{doc['provenance']['command']}` at {doc['provenance']['git_revision']}", ""]
    lines += ["| figure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in table]
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return json_path, md_path
