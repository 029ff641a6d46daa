"""Allows `python -m portfwd`, which tests use to run the CLI under a chosen interpreter."""

from portfwd.cli import main

main()
