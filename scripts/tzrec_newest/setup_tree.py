"""Build ``$TZREC_WORK/src``: a TorchEasyRec checkout with ``checkpoint_util`` -> reckpt.

A check, not part of reckpt: the newest TorchEasyRec ``checkpoint_util_test.py`` (GitHub, not
on the package registries) run against reckpt with the import changed. ``run.sh`` calls it;
``TZREC_GIT_DIR`` names a git directory of TorchEasyRec (a clone or a bare snapshot).
"""

from __future__ import annotations

import ast
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORK = Path(os.environ.get("TZREC_WORK", REPO / "build" / "tzrec-newest"))
SRC = WORK / "src"
GIT_DIR = os.environ.get("TZREC_GIT_DIR", str(WORK / "TorchEasyRec.git"))
REV = os.environ.get("TZREC_REV", "HEAD")
TEST_FILE = "tzrec/utils/checkpoint_util_test.py"

INIT = """# Minimal init (scratch harness): the real one imports every model.
import os as _os

if "OMP_NUM_THREADS" not in _os.environ:
    _os.environ["OMP_NUM_THREADS"] = "1"
"""

# test_util imports pandas, hypothesis, tzrec.models ...; the test only needs make_test_dir:
# a new folder under ./tmp.
TEST_UTIL = '''# Stand-in for tzrec.utils.test_util (the real one needs pandas, hypothesis, every model).
import os
import tempfile


def make_test_dir(prefix: str = "tzrec_") -> str:
    """A new folder under ./tmp, readable by everyone."""
    os.makedirs("./tmp", exist_ok=True)
    path = tempfile.mkdtemp(prefix=prefix, dir="./tmp")
    os.chmod(path, 0o755)
    return path
'''

SHIM = """# TorchEasyRec's checkpoint_util replaced by reckpt (scripts/tzrec_newest).
# Every name the newest checkpoint_util_test.py uses is taken from ``reckpt``'s top level
# when it exists there; a missing one stays undefined here (listed in MISSING) so that only
# the tests using it fail, with AttributeError.
import reckpt as _reckpt

# TorchEasyRec-internal flag (tzrec.utils.dynamicemb_util); the tests only mock.patch it.
has_dynamicemb = False

NAMES = {names!r}
MISSING = []
for _name in NAMES:
    try:
        globals()[_name] = getattr(_reckpt, _name)
    except AttributeError:
        MISSING.append(_name)
"""

ANCHOR = "from tzrec.utils import checkpoint_util, misc_util\n"
HELPER = '''

def _reckpt_real_checkpoint(path):
    """Inserted by the scratch harness: a committed reckpt checkpoint, not an empty folder."""
    import reckpt

    reckpt.save_model(path, torch.nn.Linear(1, 1))
'''


def _fake(name: str, count: int, real: str | None = None) -> tuple[str, str, int]:
    return (
        f"os.makedirs(os.path.join(self.test_dir, {name}))",
        f"_reckpt_real_checkpoint(os.path.join(self.test_dir, {real or name}))",
        count,
    )


REWRITES = [
    _fake('"model.ckpt-0"', 2),
    _fake('"model.ckpt-10"', 2),
    _fake('"model.ckpt-20"', 1),
    _fake('"custom/model"', 1, real='"custom"'),
    _fake('f"model.ckpt-{step}"', 6),
]


def used_names(source: str) -> list[str]:
    tree = ast.parse(source)
    names = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "checkpoint_util"
        ):
            names.add(node.attr)
        # mock.patch.object(checkpoint_util, "name", ...)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "object"
            and node.args
            and isinstance(node.args[0], ast.Name)
            and node.args[0].id == "checkpoint_util"
        ):
            names.add(node.args[1].value)
    return sorted(names - {"has_dynamicemb"})


def adapt(source: str) -> str:
    assert source.count(ANCHOR) == 1, "anchor import line not found once"
    for old, new, count in REWRITES:
        found = source.count(old)
        assert found == count, f"{old!r}: found {found}, expected {count} (upstream test changed?)"
        source = source.replace(old, new)
    left = re.findall(r"os\.makedirs\([^\n]*\)", source)
    assert not left, f"unexpected os.makedirs left: {left}"
    return source.replace(ANCHOR, ANCHOR + HELPER)


def main() -> None:
    if SRC.exists():
        shutil.rmtree(SRC)
    SRC.mkdir(parents=True)
    tar = subprocess.run(
        ["git", f"--git-dir={GIT_DIR}", "archive", "--format=tar", REV, "tzrec"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        tf.extractall(SRC, filter="data")
    commit = subprocess.run(
        ["git", f"--git-dir={GIT_DIR}", "rev-parse", REV], check=True, capture_output=True, text=True
    ).stdout.strip()
    (SRC / "COMMIT").write_text(commit + "\n")
    test = SRC / TEST_FILE
    source = test.read_text()
    names = used_names(source)
    test.write_text(adapt(source))
    (SRC / "tzrec/utils/checkpoint_util.py").write_text(SHIM.format(names=names))
    (SRC / "tzrec/__init__.py").write_text(INIT)
    (SRC / "tzrec/utils/test_util.py").write_text(TEST_UTIL)
    stub = SRC / "alibabacloud_credentials"
    stub.mkdir()
    (stub / "__init__.py").write_text("# Stub (scratch harness) for misc_util's module-level import.\n")
    (stub / "provider.py").write_text(
        "class EcsRamRoleCredentialsProvider:  # stub\n"
        "    def __init__(self, *args, **kwargs):\n"
        "        raise RuntimeError('alibabacloud_credentials stub')\n"
    )
    protos = sorted(str(p.relative_to(SRC)) for p in (SRC / "tzrec/protos").rglob("*.proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", *protos], cwd=SRC, check=True
    )
    print(f"tree ready: {SRC} (TorchEasyRec {commit[:10]}), {len(protos)} protos, names: {names}")


if __name__ == "__main__":
    main()
