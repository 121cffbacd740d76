#!/usr/bin/env bash
# Refresh requirements-lock.txt: resolve pyproject.toml (all extras) in a throw-away virtualenv, pin every
# third-party distribution that got installed, and record the sha256 of the file pip takes for each.
# Run it after changing a dependency in pyproject.toml, then commit both files; scripts/_env.sh installs from
# the lock with --require-hashes, so a fresh machine gets exactly these versions.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$PY" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip setuptools wheel
# torch==2.13.0 is the CPU build on this machine's disk (see pyproject.toml); pip takes it from there.
"$work/venv/bin/python" -m pip install -q -e '.[dev,s3]'
"$work/venv/bin/python" -m pip freeze --exclude-editable | grep -v '^-e ' > "$work/pins.txt"
"$work/venv/bin/python" -m pip download -q --no-deps -r "$work/pins.txt" -d "$work/files"
"$work/venv/bin/python" scripts/_hash_lock.py "$work/pins.txt" "$work/files" > requirements-lock.txt
echo "requirements-lock.txt: $(grep -c '==' requirements-lock.txt) pinned distributions" >&2
