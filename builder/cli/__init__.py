"""Command-line interface: thin Click commands over the stage packages.

Each command lives in its own module and registers itself on `main` when imported.
"""

from builder.cli import info, synth  # noqa: F401  (registers commands)
from builder.cli.app import main

__all__ = ["main"]
