#!/usr/bin/env bash
# Runs the main job, `blobleases demo`, installing the package first if needed.
# Usage: bash scripts/demo.sh [demo options]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import blobleases.cli" >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet --disable-pip-version-check -e .
fi
if command -v blobleases >/dev/null 2>&1; then
    exec blobleases demo "$@"
fi
exec "$PYTHON" -m blobleases demo "$@"
