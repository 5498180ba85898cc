#!/usr/bin/env bash
# Sets up .venv with the test dependencies on first use, then runs the suite.
# Extra arguments go to pytest, e.g. ./run_tests.sh tests/unit -x
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    # Why first: a venv of an older Python installs nothing (pip refuses the project) and stays behind.
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "TokenVault needs Python 3.11 or later; $PYTHON is $("$PYTHON" -V 2>&1 || echo missing): set PYTHON to one (PYTHON=python3.11 $0 ...)" >&2
        exit 2
    fi
    "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$stamp" ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e '.[test]'
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi
# -rs: each skipped test says why (a missing system package, no root).
exec "$VENV/bin/python" -m pytest -q -rs -p no:cacheprovider "$@"
