#!/usr/bin/env bash
# Create the virtual environment (default .venv, or $RECKPT_VENV) with the pinned stack,
# the test tools, and reckpt installed in editable mode. Idempotent: a second run with
# unchanged requirements returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RECKPT_VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
want=$(cat requirements/*.txt pyproject.toml | sha256sum | cut -d' ' -f1)
stamp="$VENV/.reckpt-requirements"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), "reckpt needs Python 3.11"'
"$PY" -m venv "$VENV"
pip() {
  # This machine's pip config names extra local indexes that may be absent; hide that noise.
  "$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }
}
C=requirements/constraints.txt
# torch is pinned everywhere: an unpinned torch would pull a multi-GB CUDA build.
pip install -q -c "$C" torch==2.13.0 numpy fsspec s3fs xxhash -r requirements/torchrec.txt -r requirements/trainer.txt -r requirements/dev.txt
# torchrec's metadata requires the CUDA fbgemm-gpu package: install it without dependencies.
pip install -q -c "$C" --no-deps torchrec==1.8.0
pip install -q -c "$C" --no-deps -e .
"$VENV/bin/python" -c "import torch, torchrec, reckpt; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "$want" > "$stamp"
echo "environment ready: $VENV"
