"""`python -m strata ...` is the same as the `strata` command."""

from strata.cli import main

main()
