"""Run a TorchEasyRec release's own ``checkpoint_util_test.py`` against reckpt.

The release is fetched at test time (``pip download``) and unpacked into a temporary folder;
nothing of TorchEasyRec is kept in this repository. In that copy:

- ``tzrec/utils/checkpoint_util.py`` becomes one import from reckpt, of exactly the names the
  test uses (checked against the test's source);
- ``tzrec/__init__.py`` becomes a minimal one (the real one imports every model);
- in ``checkpoint_util_test.py`` the empty folders it makes to fake checkpoints for latest /
  best discovery become real committed checkpoints (reckpt counts only committed ones). The
  rewrite is a table of exact source lines with the number of times each must occur, so a
  changed upstream file fails loudly instead of being half-adapted.

Each test then runs alone in a ``python -m unittest`` subprocess (it spawns its own gloo
workers), so a failure is reported per test with that test's whole output.
"""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

TZREC_SPEC = "tzrec-sekai==0.9.6"
TEST_MODULE = "tzrec.utils.checkpoint_util_test"
TEST_FILE = "tzrec/utils/checkpoint_util_test.py"
TEST_CLASS = "CheckpointUtilTest"
TEST_NAMES = (
    "test_latest_checkpoint_with_model_dir",
    "test_best_checkpoint_model_dir",
    "test_latest_checkpoint_with_custom_dir",
    "test_dist_save_restore_model",
    "test_dist_partial_restore_model",
    "test_dist_remap_restore_model",
)
# What the 0.9.6 test calls on ``checkpoint_util`` (checked against its source by ``prepare``).
CHECKPOINT_UTIL_NAMES = (
    "best_checkpoint",
    "latest_checkpoint",
    "list_distcp_param",
    "restore_model",
    "save_model",
)

CHECKPOINT_UTIL_SOURCE = (
    "# Replaced by reckpt's test harness (tests/distributed/tzrec_suite.py).\n"
    f"from reckpt import {', '.join(CHECKPOINT_UTIL_NAMES)}  # noqa: F401\n"
)
INIT_SOURCE = (
    "# Minimal package init written by reckpt's test harness: the real one imports every model.\n"
    "import os as _os\n"
    "\n"
    'if "OMP_NUM_THREADS" not in _os.environ:\n'
    '    _os.environ["OMP_NUM_THREADS"] = "1"\n'
)

# The helper is inserted right after this line of the test file.
ANCHOR = "from tzrec.utils import checkpoint_util, misc_util\n"
HELPER = '''

def _reckpt_real_checkpoint(path):
    """Inserted by reckpt's harness: a committed checkpoint instead of an empty folder."""
    import reckpt
    import torch

    reckpt.save_model(path, torch.nn.Linear(1, 1))
'''


@dataclass(frozen=True)
class Rewrite:
    old: str
    new: str
    count: int


def _fake(name: str, count: int, real: str | None = None) -> Rewrite:
    """The test's ``os.makedirs`` of a fake checkpoint ``name`` -> a real one at ``real``."""
    return Rewrite(
        old=f'os.makedirs(os.path.join(self.test_dir, "{name}"))',
        new=f'_reckpt_real_checkpoint(os.path.join(self.test_dir, "{real or name}"))',
        count=count,
    )


# Exact source text -> replacement, and how often it must occur in the 0.9.6 file.
REWRITES = (
    _fake("model.ckpt-0", 2),
    _fake("model.ckpt-10", 2),
    _fake("model.ckpt-20", 1),
    # A custom checkpoint path: TorchEasyRec fakes it with an empty ``<path>/model`` folder;
    # the real checkpoint is saved at ``<path>`` itself (and has ``model/`` inside).
    _fake("custom/model", 1, real="custom"),
)
# ``os.makedirs`` calls left after the rewrite: only the test's scratch root.
KEPT_MAKEDIRS = ('os.makedirs("./tmp")',)

# gloo's C++ objects sometimes abort a worker during interpreter teardown, after the test's
# work is done (TorchEasyRec's workers never destroy their process group; real TorchEasyRec
# fails the same way now and then). A test whose only failure is such an abort (the abort
# message, "worker-N failed." and no worker raising a Python exception) is run again.
TEARDOWN_ABORT = "terminate called without an active exception"
WORKER_EXIT = re.compile(r"RuntimeError: worker-\d+ failed\.")
WORKER_EXCEPTION = "Process SpawnProcess-"
ATTEMPTS = 3


class HarnessError(AssertionError):
    """The downloaded release does not look like the one this harness was written for."""


def download(dest: Path, spec: str = TZREC_SPEC) -> Path:
    """``pip download --no-deps`` ``spec`` into ``dest``; returns the wheel's path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        spec,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        raise HarnessError(
            f"could not download {spec} (exit {proc.returncode}, wheels {wheels}): "
            f"{' '.join(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return wheels[0]


def adapt_test_source(source: str) -> str:
    """The test file with fake checkpoint folders made real; raises on any unexpected shape."""
    if source.count(ANCHOR) != 1:
        raise HarnessError(f"{TEST_FILE}: expected the line {ANCHOR.strip()!r} exactly once")
    for rw in REWRITES:
        found = source.count(rw.old)
        if found != rw.count:
            raise HarnessError(f"{TEST_FILE}: {rw.old!r} occurs {found} times, expected {rw.count}")
        source = source.replace(rw.old, rw.new)
    left = re.findall(r"os\.makedirs\([^\n]*\)", source)
    if sorted(left) != sorted(KEPT_MAKEDIRS):
        raise HarnessError(f"{TEST_FILE}: unexpected os.makedirs calls after the rewrite: {left}")
    return source.replace(ANCHOR, ANCHOR + HELPER)


def _test_surface(source: str) -> tuple[set[str], set[str]]:
    """(names used as ``checkpoint_util.<name>``, ``test_*`` methods of the test class)."""
    tree = ast.parse(source)
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "checkpoint_util"
    }
    tests = {
        item.name
        for node in tree.body
        if isinstance(node, ast.ClassDef) and node.name == TEST_CLASS
        for item in node.body
        if isinstance(item, ast.FunctionDef) and item.name.startswith("test_")
    }
    return used, tests


def prepare(wheel: Path, root: Path) -> Path:
    """Unpack ``wheel``'s ``tzrec`` package under ``root`` and adapt it; returns ``root``."""
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.startswith("tzrec/")]
        zf.extractall(root, members)
    test_path = root / TEST_FILE
    source = test_path.read_text()
    used, tests = _test_surface(source)
    if used != set(CHECKPOINT_UTIL_NAMES):
        raise HarnessError(
            f"{TEST_FILE} uses checkpoint_util.{sorted(used)}, expected {list(CHECKPOINT_UTIL_NAMES)}"
        )
    if tests != set(TEST_NAMES):
        raise HarnessError(f"{TEST_FILE} has tests {sorted(tests)}, expected {sorted(TEST_NAMES)}")
    test_path.write_text(adapt_test_source(source))
    (root / "tzrec/utils/checkpoint_util.py").write_text(CHECKPOINT_UTIL_SOURCE)
    (root / "tzrec/__init__.py").write_text(INIT_SOURCE)
    return root


@dataclass(frozen=True)
class Outcome:
    passed: bool
    attempts: int
    output: str


def _run_once(root: Path, test_name: str, timeout_s: float) -> tuple[int, str]:
    import reckpt

    reckpt_root = str(Path(reckpt.__file__).resolve().parent.parent)
    path = [str(root), reckpt_root, *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "unittest", "-v", f"{TEST_MODULE}.{TEST_CLASS}.{test_name}"]
    # Own session: on a timeout the spawned gloo workers are killed with the runner.
    proc = subprocess.Popen(
        cmd,
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return -1, f"{out}\n[harness] timed out after {timeout_s}s"
    return proc.returncode, out


def _teardown_abort_only(out: str) -> bool:
    return TEARDOWN_ABORT in out and bool(WORKER_EXIT.search(out)) and WORKER_EXCEPTION not in out


def run_test(root: Path, test_name: str, timeout_s: float = 300.0) -> Outcome:
    """Run one upstream test; a teardown-only abort (see ``TEARDOWN_ABORT``) is retried."""
    outputs = []
    for attempt in range(1, ATTEMPTS + 1):
        rc, out = _run_once(root, test_name, timeout_s)
        outputs.append(f"===== attempt {attempt}: exit {rc}\n{out}")
        # unittest ends with "OK" (or "OK (skipped=1)", which is not a pass here).
        if rc == 0 and re.search(r"^Ran 1 test in .*\n\nOK\s*$", out, re.M):
            return Outcome(True, attempt, "\n".join(outputs))
        if not _teardown_abort_only(out):
            break
    return Outcome(False, len(outputs), "\n".join(outputs))
