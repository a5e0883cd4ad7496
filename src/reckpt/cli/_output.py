"""Output helpers of the CLI: progress bars on terminals, tables or JSON, sizes."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["progress", "emit", "human_size"]

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """A progress bar on stderr when it is a terminal; plain iteration otherwise."""
    if not sys.stderr.isatty():
        yield from items
        return
    import shutil

    from tqdm import tqdm

    # A pty without a size reports 0 columns and rows, and tqdm then hides its bar.
    size = shutil.get_terminal_size((80, 24))
    yield from tqdm(
        items,
        desc=desc,
        total=total,
        file=sys.stderr,
        leave=False,
        ncols=size.columns,
        nrows=size.lines,
        mininterval=0,
    )


def emit(args: argparse.Namespace, doc: Any, lines: list[str]) -> None:
    print(json.dumps(doc, indent=2, default=str) if args.json else "\n".join(lines))


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)
