# Sourced by the scripts: a project virtualenv with fedscan and its dev extras, and quiet, offline services.
# Installs from requirements-lock.txt; reinstalls only when pyproject.toml or the lock changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "fedscan: creating .venv with $($PY --version)" >&2
  "$PY" -m venv .venv
fi
stamp=".venv/.fedscan-installed"
want="$(cat pyproject.toml requirements-lock.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "fedscan: installing the locked dependencies and fedscan into .venv (first run takes a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
  # Every third-party distribution at the version and file hash in requirements-lock.txt (refresh it with
  # scripts/lock.sh); torch is the CPU build 2.13.0 on this machine's disk. Then fedscan itself, editable.
  .venv/bin/python -m pip install -q --require-hashes -r requirements-lock.txt
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
  .venv/bin/python -m pip check >&2
  echo "$want" > "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"
# No phone-home from Prefect or Flower; never install app dependencies at run time.
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
