#!/usr/bin/env bash
# Sets up .venv with the test dependencies on first use, then runs the suite.
# Extra arguments go to pytest, e.g. ./run_tests.sh tests/unit -x
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ]; then
    . ./make_venv.sh
fi
if [ ! -f "$stamp" ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e '.[test]'
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi
# -rs: each skipped test says why (a missing system package, no root).
exec "$VENV/bin/python" -m pytest -q -rs -p no:cacheprovider "$@"
