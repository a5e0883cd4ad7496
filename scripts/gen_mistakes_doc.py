"""Write docs/mistakes.md from the table in tests/helpers/mistakes.py (run from the repository root)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers.mistakes import MISTAKES, normalise, observed, render_markdown


def main() -> None:
    rows = []
    for case in MISTAKES:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append((case, normalise(str(observed(case, Path(tmp))), Path(tmp))))
    out = Path(__file__).resolve().parents[1] / "docs" / "mistakes.md"
    out.write_text(render_markdown(rows))
    print(f"wrote {os.path.relpath(out)} ({len(rows)} mistakes)")


if __name__ == "__main__":
    main()
