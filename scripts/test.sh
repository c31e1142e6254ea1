#!/usr/bin/env bash
# The README's test command: set up (all extras), lint, type-check, run every test.
# Exits non-zero on any failure, and also when pytest ran no test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh gpu,dev
venv="${FASTBYOL_VENV:-.venv}"
"$venv/bin/ruff" check .
"$venv/bin/mypy" fastbyol kernels benchmarks
set +e
"$venv/bin/python" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "test.sh: pytest collected no tests" >&2; exit 1; fi
exit "$rc"
