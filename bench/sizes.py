"""The command line the in-process size benchmarks share (bench/audit_trim.py, bench/memtable_bloom.py):
one ``measure(directory, count)`` line per count, each in a fresh temporary directory."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path


def run_over_sizes(description: str, option: str, default: str, prefix: str,
                   measure: Callable[[Path, int], str]) -> int:
    """Parse ``--<option> N,N,...`` and ``--directory``; print ``measure`` for each count."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(f"--{option}", default=default, help=f"{option} counts, comma-separated")
    parser.add_argument("--directory", default=None, help="where to build the stores (default: a temporary one)")
    arguments = parser.parse_args()
    for count in (int(text) for text in getattr(arguments, option).split(",") if text.strip()):
        with tempfile.TemporaryDirectory(prefix=prefix, dir=arguments.directory) as temporary:
            print(measure(Path(temporary), count), flush=True)
    return 0
