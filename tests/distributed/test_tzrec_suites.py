"""TorchEasyRec 0.9.6's own ``checkpoint_util_test.py``, run against reckpt.

The wheel is downloaded once per session (``pip download``; a failed download fails the
tests); see ``tests/distributed/tzrec_suite.py`` for how its copy is adapted.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed import tzrec_suite


@pytest.fixture(scope="session")
def tzrec_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        wheel = tzrec_suite.download(tmp_path_factory.mktemp("tzrec-wheel"))
        return tzrec_suite.prepare(wheel, tmp_path_factory.mktemp("tzrec-src"))
    except tzrec_suite.HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.mark.parametrize("test_name", tzrec_suite.TEST_NAMES)
def test_tzrec_checkpoint_util(tzrec_tree: Path, test_name: str) -> None:
    outcome = tzrec_suite.run_test(tzrec_tree, test_name)
    if not outcome.passed:
        pytest.fail(
            f"{tzrec_suite.TZREC_SPEC} {tzrec_suite.TEST_CLASS}.{test_name} failed "
            f"({outcome.attempts} attempt(s)):\n{outcome.output}",
            pytrace=False,
        )
    if outcome.attempts > 1:
        print(f"{test_name}: passed on attempt {outcome.attempts} (gloo teardown abort before)")
