"""Every docstring example (``>>>``) of every module of reckpt runs, one test per module.

A module without examples still counts: its test checks that it imports. Examples run in a
fresh temporary working directory, with the module's globals, under doctest's ELLIPSIS option.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import reckpt

# Modules that cannot be imported for their docstrings: reckpt.cli.__main__ runs the command line.
SKIP = {"reckpt.cli.__main__"}

# A package that fails to import is still listed (its own test then fails with the error).
MODULES = sorted(
    {"reckpt"}
    | {m.name for m in pkgutil.walk_packages(reckpt.__path__, "reckpt.", onerror=lambda name: None)} - SKIP
)


def run_examples(name: str) -> tuple[int, int, str]:
    """``(examples, failures, report)`` of the docstring examples of module ``name``."""
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report: list[str] = []
    for test in doctest.DocTestFinder().find(module, name):
        runner.run(test, out=report.append)
    return runner.tries, runner.failures, "".join(report)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _, failed, report = run_examples(name)
    assert failed == 0, f"{failed} docstring example(s) of {name} failed:\n{report}"


def test_examples_are_found() -> None:
    attempted, _, _ = run_examples("reckpt.policy")
    assert attempted > 0, "no examples found in reckpt.policy: is the finder looking anywhere?"
    assert "reckpt.lifecycle.manager" in MODULES and "reckpt.cli.__main__" not in MODULES
