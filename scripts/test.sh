#!/usr/bin/env bash
# Installs the test dependencies and services, then runs every check and test.
# Usage: bash scripts/test.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

"$PYTHON" -m pip install --quiet --disable-pip-version-check -e '.[test]'

# The Redis tests start their own redis-server processes on loopback; the
# binary comes from Debian's package when the machine does not have it.
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server redis-tools >/dev/null
fi

"$PYTHON" -m ruff check src tests benchmarks
"$PYTHON" -m mypy
"$PYTHON" -m pytest "$@"
