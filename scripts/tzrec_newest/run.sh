#!/usr/bin/env bash
# Run the newest TorchEasyRec tzrec/utils/checkpoint_util_test.py against reckpt (import changed).
# The file lives on GitHub only (not on the package registries), so this is a manual check, not
# part of the test suite; TorchEasyRec 0.9.6's test file runs in CI (tests/distributed/test_tzrec_suites.py).
#
#   git clone --bare https://github.com/alibaba/TorchEasyRec build/tzrec-newest/TorchEasyRec.git
#   bash scripts/tzrec_newest/run.sh [pytest args, e.g. -k remap]
#
# Env: TZREC_GIT_DIR (a TorchEasyRec git dir), TZREC_REV (default HEAD), TZREC_WORK (default
# build/tzrec-newest), PY (default .venv/bin/python). Test-only packages (parameterized,
# grpcio-tools for the .proto files) go into $TZREC_WORK/extra, never into the venv.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
HERE="$REPO/scripts/tzrec_newest"
WORK=${TZREC_WORK:-$REPO/build/tzrec-newest}
PY=${PY:-$REPO/.venv/bin/python}
EXTRA="$WORK/extra"
export TZREC_WORK="$WORK"
if [ ! -d "$EXTRA/parameterized" ]; then
  "$PY" -m pip install -q --disable-pip-version-check --target "$EXTRA" \
    -c "$REPO/requirements/constraints.txt" parameterized grpcio-tools
fi
PYTHONPATH="$EXTRA" "$PY" "$HERE/setup_tree.py"
rm -rf "$WORK/run" && mkdir -p "$WORK/run"
cd "$WORK/run"
set +e
OMP_NUM_THREADS=1 PYTHONPATH="$WORK/src:$EXTRA" timeout 1800 "$PY" -m pytest \
  -p no:cacheprovider -o addopts= -o timeout=300 --rootdir="$WORK/run" -q -rfE --log-level=WARNING --tb=short \
  --junitxml="$WORK/run/junit.xml" "$WORK/src/tzrec/utils/checkpoint_util_test.py" "$@" \
  > "$WORK/run/pytest.log" 2>&1
rc=$?
set -e
tail -3 "$WORK/run/pytest.log"
"$PY" "$HERE/summarize.py" "$WORK/run/junit.xml" "$WORK/src/tzrec/utils/checkpoint_util_test.py" | tee "$WORK/run/summary.txt"
echo "full log: $WORK/run/pytest.log (pytest exit $rc)"
