"""Command-line interface: thin Click commands over the stage packages.

Each command lives in its own module and registers itself on `main` when imported; `main`
imports it when the command is first looked up (builder.cli.app.COMMANDS).
"""

import os

# Hugging Face libraries' own tqdm bars ("Loading weights", "Fetching files") are not builder's
# output: they would interleave with ours and land in logs. Read when transformers is imported.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from builder.cli.app import main  # noqa: E402

__all__ = ["main"]
