#!/usr/bin/env bash
# Run the test suite on Python 3.12: build (or reuse) the environment .venv312 with the same
# pinned stack as .venv (scripts/bootstrap.sh with PYTHON=python3.12), then run pytest there.
#
#   bash scripts/test_python312.sh                    # the whole suite
#   bash scripts/test_python312.sh tests/unit -x      # arguments go to pytest
#
# The first run downloads PyPI's torch 2.13.0 for Python 3.12 (the CPU-only wheel on local disk
# is for 3.11 only): the CUDA-enabled build, which runs on CPU, about 1.3 GB of downloads and a
# 5.4 GB environment; later runs reuse .venv312. RECKPT_VENV and PYTHON override the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHON=${PYTHON:-python3.12}
export RECKPT_VENV=${RECKPT_VENV:-.venv312}
bash scripts/bootstrap.sh
"$RECKPT_VENV/bin/python" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__)'
set +e
"$RECKPT_VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "no tests ran"; exit 1; fi
exit "$rc"
