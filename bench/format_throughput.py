"""FF1 and format-preserving tokens per second on one core, beside opaque tokens, in-process.

Usage:
    .venv/bin/python bench/format_throughput.py [--values N] [--runs N]

Prints the median of --runs timings for: FF1 alone (one encryption of a
12-digit head, the card token's core), card tokens (FormatKeys.card_token:
the Luhn shift, FF1 and cycle-walking), digits tokens of 9 and 16 digits,
then what a tokenize seals per value on the primary: a card (normalize, card
token and AES-SIV of the value) beside an opaque value (EpochKeys.seal, HMAC
token and AES-SIV). Card numbers are random and Luhn-valid; keys are random.
The end-to-end comparison through HTTP is `bench/loadgen.py run --mode
tokenize --format card` beside `--format opaque`. Measures and prints only.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from crypto_throughput import median_seconds  # noqa: E402  (bench/, beside this file)
from tokenvault.crypto.ff1 import Ff1, digits_to_numerals  # noqa: E402
from tokenvault.crypto.formats import FormatKeys, luhn_valid, normalize_card  # noqa: E402
from tokenvault.crypto.keys import EPOCH_SECRET_BYTES, EpochKeys  # noqa: E402


def random_cards(count: int, generator: random.Random) -> list[str]:
    cards = []
    for _ in range(count):
        partial = f"4{generator.randrange(10**14):014d}"
        cards.append(next(partial + check for check in "0123456789" if luhn_valid(partial + check)))
    return cards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--values", type=int, default=10_000, help="values per run")
    parser.add_argument("--runs", type=int, default=5, help="runs; the median is printed")
    arguments = parser.parse_args(argv)
    if arguments.values < 1 or arguments.runs < 1:
        parser.error("--values and --runs must be at least 1")
    generator = random.Random(1)
    cards = random_cards(arguments.values, generator)
    spaced = [" ".join(card[start:start + 4] for start in range(0, 16, 4)) for card in cards]
    heads = [digits_to_numerals(card[:12]) for card in cards]
    nines = [card[:9] for card in cards]
    opaque = [f"synthetic-{generator.getrandbits(96):024x}" for _ in range(arguments.values)]
    ff1 = Ff1(os.urandom(32), 10)
    keys = EpochKeys(1, os.urandom(EPOCH_SECRET_BYTES))
    formats = FormatKeys(os.urandom(32))
    tweak = b"\x10" + b"1234"  # the card tweak: length and kept digits
    cases: list[tuple[str, Callable[[], object]]] = [
        ("FF1, one 12-digit encryption", lambda: [ff1.encrypt(head, tweak) for head in heads]),
        ("card token (16 digits)", lambda: [formats.card_token(card) for card in cards]),
        ("digits token (9 digits)", lambda: [formats.digits_token(value) for value in nines]),
        ("digits token (16 digits)", lambda: [formats.digits_token(card) for card in cards]),
        ("seal: card, with separators", lambda: [keys.seal_format("card", normalize_card(card)) for card in spaced]),
        ("seal: opaque", lambda: [keys.seal(value) for value in opaque]),
    ]
    print(f"python {sys.version.split()[0]}, {arguments.values} values, median of {arguments.runs} runs, one core")
    for label, operation in cases:
        seconds = median_seconds(operation, arguments.runs)
        print(f"{label:<30} {seconds / arguments.values * 1e6:7.2f} us/value  "
              f"{arguments.values / seconds:>10,.0f} per second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
