"""Output directories that appear only when complete."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from builder.errors import UserError


def staging_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.partial")


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging directory beside `out`; rename it to `out` only if the block succeeds.

    A failed or interrupted run leaves `.NAME.partial`, never a directory that looks complete.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists (pass --overwrite to replace it)")
    stage = staging_path(out)
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(stage, out)
