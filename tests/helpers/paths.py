"""Where things are: the repository root, for tests that run its scripts, examples or CLI."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The repository root (holds ``src/``, ``tests/``, ``docs/``, ``examples/``, ``benchmarks/``)."""
