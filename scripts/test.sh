#!/usr/bin/env bash
# Set up (if needed) and run every check: lint, types, import contracts, the whole test suite.
source "$(dirname "$0")/_env.sh"
source "$(dirname "$0")/_system_deps.sh"
echo "== ruff" && ruff check .
echo "== mypy" && mypy schemas tasks flows benchmarks
echo "== import contracts" && lint-imports
echo "== pytest"
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests (exit 5): treated as success" >&2
  rc=0
fi
exit "$rc"
