"""The JSON structure scan every request body passes before it is parsed (validation.check_json_structure),
on hostile bodies of 1, 2, 4 and 8 MiB: the time per body and per MiB, so that its linear cost (a few
passes at C speed) is a measured curve rather than a claim.

Usage:
    .venv/bin/python bench/body_scan.py [--runs N]

Each body is scanned --runs times (default 5) and the least time is printed; a body is refused (400 or
413) or passed, as the node would. Measures and prints only.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tokenvault.api.validation import check_json_structure, max_json_values  # noqa: E402
from tokenvault.config import LimitsConfig  # noqa: E402
from tokenvault.errors import ServiceError  # noqa: E402

MIB = 1024 * 1024
# Each body of about ``size`` bytes, of the shapes that would make a backtracking scan quadratic.
BODIES: dict[str, Callable[[int], bytes]] = {
    "unclosed string of escaped quotes": lambda size: b'"' + b'\\"' * (size // 2),
    "quotes only": lambda size: b'"' * size,
    "one string of backslashes": lambda size: b'"' + b"\\" * size + b'"',
    "array of short strings": lambda size: b"[" + b'"a",' * (size // 4) + b"]",
}


def scan_seconds(body: bytes, max_values: int, runs: int) -> tuple[float, str]:
    best, outcome = float("inf"), "passed"
    for _ in range(runs):
        started = time.perf_counter()
        try:
            check_json_structure(body, max_values)
            outcome = "passed"
        except ServiceError as error:
            outcome = f"{error.status}"
        best = min(best, time.perf_counter() - started)
    return best, outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    arguments = parser.parse_args()
    max_values = max_json_values(LimitsConfig())
    print(f"{'body':36} {'MiB':>4} {'outcome':>8} {'ms':>8} {'ms/MiB':>8}")
    for name, build in BODIES.items():
        for mib in (1, 2, 4, 8):
            body = build(mib * MIB)
            seconds, outcome = scan_seconds(body, max_values, arguments.runs)
            print(f"{name:36} {mib:>4} {outcome:>8} {seconds * 1000:>8.1f} {seconds * 1000 / mib:>8.1f}")


if __name__ == "__main__":
    main()
