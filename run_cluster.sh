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
if [ ! -x "$VENV/bin/python" ]; then
    . ./make_venv.sh
fi
if [ ! -f "$runtime_stamp" ] && [ ! -f "$VENV/.installed-$hash" ]; then
    echo "installing tokenvault into $VENV (first use)" >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e .
    rm -f "$VENV"/.installed-runtime-*
    touch "$runtime_stamp"
fi
exec "$VENV/bin/python" -m tokenvault.devcluster "$@"
