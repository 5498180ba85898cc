# Sourced by run_tests.sh and run_cluster.sh when $VENV has no python yet: makes it with $PYTHON (python3
# unless set), once that is known to be Python 3.11 or later. Why first: a venv of an older Python
# installs nothing (pip refuses the project) and stays behind, used by every later run.
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    if command -v "$PYTHON" >/dev/null 2>&1; then
        found="$("$PYTHON" -V 2>&1 | head -n 1)" || found="a program that does not say its version"
    else
        found="not found"
    fi
    echo "TokenVault needs Python 3.11 or later; $PYTHON is $found: set PYTHON to one (PYTHON=python3.11 $0 ...)" >&2
    exit 2
fi
echo "creating $VENV with $PYTHON (first use)" >&2
if ! "$PYTHON" -m venv "$VENV"; then
    # Why: a half-made .venv (a python and no pip) was taken as made by every later run, which failed at pip.
    rm -rf "$VENV"
    echo "could not create $VENV with $PYTHON (on Debian or Ubuntu: apt-get install python3-venv)" >&2
    exit 2
fi
