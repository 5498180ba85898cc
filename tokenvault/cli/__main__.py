"""`python -m tokenvault.cli ...`: the `tokenvault` command."""

from tokenvault.cli.main import main

main()
