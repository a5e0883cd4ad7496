"""Every user mistake in tests/helpers/mistakes.py raises its error with its exact message; docs match."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers.mistakes import MISTAKES, Mistake, normalise, observed, render_markdown
from tests.helpers.paths import REPO


def test_at_least_thirty_mistakes() -> None:
    assert len(MISTAKES) >= 30 and len({m.name for m in MISTAKES}) == len(MISTAKES)


@pytest.mark.parametrize("case", MISTAKES, ids=[m.name for m in MISTAKES])
def test_mistake(case: Mistake, tmp_path: Path) -> None:
    err = observed(case, tmp_path)
    assert isinstance(err, case.error), f"{type(err).__name__}: {err}"
    assert isinstance(err, Exception), "never a BaseException outside Exception"
    assert normalise(str(err), tmp_path) == case.message


def test_docs_table_matches(tmp_path_factory: pytest.TempPathFactory) -> None:
    rows = []
    for case in MISTAKES:
        d = tmp_path_factory.mktemp("m")
        rows.append((case, normalise(str(observed(case, d)), d)))
    want = render_markdown(rows)
    have = (REPO / "docs" / "mistakes.md").read_text()
    assert have == want, "docs/mistakes.md is stale: run python scripts/gen_mistakes_doc.py"
    assert os.path.exists(REPO / "scripts" / "gen_mistakes_doc.py")
