#!/usr/bin/env bash
# Installs the test dependencies and services, then runs every check and test
# on each supported Python (3.11, 3.12 and 3.13).
# Usage: bash scripts/test.sh [extra pytest arguments]
# BLOBLEASES_PYTHONS="python3.12 ..." picks the interpreters instead;
# BLOBLEASES_TEST_WORKERS=N runs N test processes per Python (default 2).
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

# Debian packages of the servers and tools the tests start themselves, each
# installed only when the machine lacks it: redis-server (tests/redis_servers.py),
# tmux (tests/test_top.py runs `blobleases top` in a real terminal) and
# PostgreSQL (tests/pg_servers.py: initdb and pg_ctl, on loopback).
missing=()
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    missing+=(redis-server redis-tools)
fi
if ! command -v tmux >/dev/null 2>&1; then missing+=(tmux); fi
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
    missing+=(postgresql)
fi
# ip (iproute2): tests/pg_netns.py puts each simulated host in its own netns
if ! command -v ip >/dev/null 2>&1; then missing+=(iproute2); fi
if [ "${#missing[@]}" != 0 ]; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

"${PYTHONS[0]}" -m ruff check src tests benchmarks
"${PYTHONS[0]}" -m mypy

# The documentation site (mkdocs.yml), once: any warning (a broken link, a
# docstring mkdocstrings cannot read) fails the run (not --quiet: it hides
# the warnings from --strict).
"${PYTHONS[0]}" -m pip install --quiet --disable-pip-version-check -e '.[docs]'
site_dir=$(mktemp -d)
NO_MKDOCS_2_WARNING=1 "${PYTHONS[0]}" -m mkdocs build --strict --site-dir "$site_dir"
rm -rf "$site_dir"

status=0
for python in "${PYTHONS[@]}"; do
    echo "== pytest on $("$python" --version) ($python)"
    # Two test processes (pytest-xdist): CI machines have two cores, and most
    # tests wait on child processes, servers or locks rather than compute.
    "$python" -m pytest -p no:cacheprovider -n "${BLOBLEASES_TEST_WORKERS:-2}" "$@" || status=$?
    if [ "$status" != 0 ]; then
        echo "scripts/test.sh: tests failed on $python" >&2
        exit "$status"
    fi
done
