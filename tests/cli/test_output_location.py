"""Every command that takes --overwrite refuses an OUT that equals, contains or lies inside
an input (builder.io.atomic.check_output_location), before it reads or writes anything.

convert and quantize are covered with their other bad inputs (tests/convert/test_bad_input.py,
tests/quantize/test_bad_input.py); build, reference and triton here; synth and import-smollm2
read no input directory.
"""

from __future__ import annotations

import hashlib
import shutil
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


WHERE = ["is the input", "contains the input", "lies inside the input"]


def refused_line(result) -> str:
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def over(parent: Path, source: Path, where: str) -> Path:
    return {"is the input": source, "contains the input": parent}.get(where, source / "sub")


@pytest.mark.parametrize("where", WHERE)
def test_reference_output_over_its_source_is_refused_before_it_runs(tmp_path, mixed_ckpt, where):
    """`reference SRC SRC --overwrite` used to run the golden, then replace SRC with it."""
    source = Path(shutil.copytree(mixed_ckpt, tmp_path / "src"))
    out = over(tmp_path, source, where)
    before = tree_hash(tmp_path)
    line = refused_line(
        CliRunner().invoke(main, ["reference", str(source), str(out), "--overwrite"])
    )
    assert line.startswith(f"error: {out}: the output {where} {source};")
    assert tree_hash(tmp_path) == before


@pytest.fixture(scope="module")
def pytorch_build(tmp_path_factory, mixed_ckpt):
    out = tmp_path_factory.mktemp("build") / "pt"
    args = ["build", str(mixed_ckpt), str(out), "--target", "h100x8-bf16", "--backend", "pytorch"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("input_", ["build", "tokenizer"])
@pytest.mark.parametrize("where", WHERE)
def test_triton_output_over_its_build_or_tokenizer_is_refused(
    tmp_path, pytorch_build, mixed_ckpt, where, input_
):
    """`triton BUILD BUILD --overwrite` used to replace the build with the repository; the
    tokenizer directory is an input too."""
    build = Path(shutil.copytree(pytorch_build, tmp_path / "build"))
    tokenizer = Path(shutil.copytree(mixed_ckpt, tmp_path / "tok"))
    source = build if input_ == "build" else tokenizer
    out = over(tmp_path, source, where)
    before = tree_hash(tmp_path)
    args = ["triton", str(build), str(out), "--tokenizer", str(tokenizer), "--overwrite"]
    line = refused_line(CliRunner().invoke(main, args))
    assert f"the output {where}" in line and line.startswith(f"error: {out}:")
    assert tree_hash(tmp_path) == before


@pytest.mark.parametrize("command", ["build", "reference"])
def test_output_that_is_a_regular_file_is_one_error_line(tmp_path, mixed_ckpt, command):
    out = tmp_path / "notes.txt"
    out.write_text("my notes")
    args = [command, str(mixed_ckpt), str(out), "--overwrite"]
    if command == "build":
        args += ["--target", "h100x8-bf16", "--backend", "pytorch"]
    line = refused_line(CliRunner().invoke(main, args))
    assert line.startswith(f"error: {out}: is a file, not a directory")
    assert out.read_text() == "my notes"
