"""Every command that takes --overwrite refuses an OUT that equals, contains or lies inside
an input (builder.io.atomic.check_output_location), before it reads or writes anything.

convert and quantize are covered with their other bad inputs (tests/convert/test_bad_input.py,
tests/quantize/test_bad_input.py); synth and import-smollm2 read no input directory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from click.testing import CliRunner

from builder.cli import main


def tree_hash(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("backend", ["engine", "pytorch"])
@pytest.mark.parametrize("where", ["is the input", "contains the input", "lies inside the input"])
def test_build_output_over_its_source_is_refused(tmp_path, backend, where):
    source = tmp_path / "ckpt"
    source.mkdir()
    (source / "config.json").write_text("{}")  # never read: the location is refused first
    out = {
        "is the input": source,
        "contains the input": tmp_path,
        "lies inside the input": source / "engines",
    }[where]
    before = tree_hash(tmp_path)
    result = CliRunner().invoke(
        main,
        [
            "build",
            str(source),
            str(out),
            "--target",
            "h100x8-bf16",
            "--backend",
            backend,
            "--dry-run",
            "--overwrite",
        ],
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        (
            f"error: {out}: the output {where} {source}; replacing or writing it would "
            "modify the input. Choose an OUT outside the input directory"
        )
    ]
    assert tree_hash(tmp_path) == before
