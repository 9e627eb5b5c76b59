"""Command-line interface: thin Click commands over the stage packages.

Each command lives in its own module and registers itself on `main` when imported.
"""

from builder.cli import (  # noqa: F401  (each import registers its commands)
    build,
    check,
    convert,
    demo,
    generate,
    info,
    plan,
    quantize,
    reference,
    smollm2,
    synth,
    verify,
)
from builder.cli.app import main

__all__ = ["main"]
