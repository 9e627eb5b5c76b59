"""`python -m builder.cli`: the same as the `builder` command."""

from builder.cli import main

main()
