#!/usr/bin/env bash
# Runs a local TokenVault cluster: ./run_cluster.sh start [--nodes N] | stop | status |
# kill NODE_ID | restart NODE_ID | logs NODE_ID | demo | restore BACKUP_FILE [--master-key-file PATH] |
# add-node | remove-node NODE_ID
# (./run_cluster.sh --help for more).
# On first use it creates .venv and installs the project into it. The stamp files
# follow run_tests.sh: its stamp (.installed-<hash>, project plus test extras) also
# satisfies this script, which only needs the project (.installed-runtime-<hash>).
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
hash="$(sha256sum pyproject.toml | cut -c1-16)"
runtime_stamp="$VENV/.installed-runtime-$hash"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    # Why first: a venv of an older Python installs nothing (pip refuses the project) and stays behind.
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "TokenVault needs Python 3.11 or later; $PYTHON is $("$PYTHON" -V 2>&1 || echo missing): set PYTHON to one (PYTHON=python3.11 $0 ...)" >&2
        exit 2
    fi
    echo "creating $VENV (first use)" >&2
    "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$runtime_stamp" ] && [ ! -f "$VENV/.installed-$hash" ]; then
    echo "installing tokenvault into $VENV (first use)" >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e .
    rm -f "$VENV"/.installed-runtime-*
    touch "$runtime_stamp"
fi
exec "$VENV/bin/python" -m tokenvault.devcluster "$@"
