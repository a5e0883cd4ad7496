#!/usr/bin/env bash
# Create the virtual environment (default .venv, or $RECKPT_VENV) with the pinned stack,
# the test tools, and reckpt installed in editable mode, for the interpreter $PYTHON
# (default python3.11; any Python >= 3.11, e.g. PYTHON=python3.12 RECKPT_VENV=.venv312).
# Idempotent: a second run with unchanged requirements and interpreter returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RECKPT_VENV:-.venv}
PY=${PYTHON:-python3.11}

# pyenv puts a shim for every installed version on PATH, but a shim only runs the versions
# pyenv has selected: fall back to the newest installed pythonX.Y of that name.
runs() { "$1" -c 'import sys' >/dev/null 2>&1; }
if ! runs "$PY"; then
  found=""
  if [[ "$PY" =~ ^python([0-9]+\.[0-9]+)$ ]] && command -v pyenv >/dev/null 2>&1; then
    for dir in $(ls -d "$(pyenv root)/versions/${BASH_REMATCH[1]}".* 2>/dev/null | sort -V -r); do
      if runs "$dir/bin/$PY"; then found="$dir/bin/$PY"; break; fi
    done
  fi
  if [ -z "$found" ] && [ -z "${PYTHON:-}" ] && runs python3; then found=python3; fi
  [ -n "$found" ] || { echo "bootstrap: no working interpreter '$PY'" >&2; exit 1; }
  PY=$found
fi
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), f"reckpt needs Python >= 3.11, {sys.executable} is {sys.version.split()[0]}"'
pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

want=$( (cat requirements/*.txt pyproject.toml; echo "python $pyver") | sha256sum | cut -d' ' -f1)
stamp="$VENV/.reckpt-requirements"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# An environment built by another Python version cannot be updated in place: start afresh.
if [ -x "$VENV/bin/python" ] && [ "$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" != "$pyver" ]; then
  rm -rf "$VENV"
fi
"$PY" -m venv "$VENV"
# git ignores the environment whatever its name (.venv312 ...), as Python 3.13's venv does.
echo '*' > "$VENV/.gitignore"
pip() {
  # This machine's pip config names extra local indexes that may be absent; hide that noise.
  "$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }
}
C=requirements/constraints.txt
# torch is pinned everywhere: an unpinned torch would pull a multi-GB CUDA build. The CPU
# wheel of torch 2.13.0 lies on local disk for Python 3.11 only; for another Python, pip takes
# PyPI's build of the same version (CUDA-enabled, runs on CPU; ~1.3 GB of downloads).
pip install -q -c "$C" torch==2.13.0 numpy fsspec s3fs xxhash -r requirements/torchrec.txt -r requirements/trainer.txt -r requirements/dev.txt
# torchrec's metadata requires the CUDA fbgemm-gpu package: install it without dependencies.
pip install -q -c "$C" --no-deps torchrec==1.8.0
pip install -q -c "$C" --no-deps -e .
"$VENV/bin/python" -c "import torch, torchrec, reckpt; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "$want" > "$stamp"
echo "environment ready: $VENV (Python $pyver)"
