#!/usr/bin/env bash
# Installs the test dependencies and services, then runs every check and test
# on each supported Python (3.11, 3.12 and 3.13).
# Usage: bash scripts/test.sh [extra pytest arguments]
# BLOBLEASES_PYTHONS="python3.12 ..." picks the interpreters instead.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {  # the interpreter of version $1 on PATH or under pyenv
    local version=$1 candidate
    for candidate in "python$version" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$version".*/bin/python"$version"; do
        if command -v "$candidate" >/dev/null 2>&1 \
            && "$candidate" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$version'.split('.'))))" 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

if [ -n "${BLOBLEASES_PYTHONS:-}" ]; then
    read -r -a PYTHONS <<< "$BLOBLEASES_PYTHONS"
else
    PYTHONS=()
    for version in 3.11 3.12 3.13; do
        if ! found=$(find_python "$version"); then
            echo "scripts/test.sh: no Python $version found (on PATH or under pyenv)" >&2
            exit 1
        fi
        PYTHONS+=("$found")
    done
fi

for python in "${PYTHONS[@]}"; do
    "$python" -m pip install --quiet --disable-pip-version-check -e '.[test]'
done

# The Redis tests start their own redis-server processes on loopback; the
# binary comes from Debian's package when the machine does not have it.
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server redis-tools >/dev/null
fi

# The Postgres tests start their own PostgreSQL cluster (initdb, pg_ctl) on
# loopback; Debian installs the binaries under /usr/lib/postgresql/*/bin.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
fi

"${PYTHONS[0]}" -m ruff check src tests benchmarks
"${PYTHONS[0]}" -m mypy

status=0
for python in "${PYTHONS[@]}"; do
    echo "== pytest on $("$python" --version) ($python)"
    "$python" -m pytest -p no:cacheprovider "$@" || status=$?
    if [ "$status" != 0 ]; then
        echo "scripts/test.sh: tests failed on $python" >&2
        exit "$status"
    fi
done
