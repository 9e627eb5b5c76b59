"""Click's own usage errors are bad input like any other: one `error:` line, exit 2."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from builder.cli import main


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["convert", "--bogus"], "No such option '--bogus'"),
        (["convert", "/nonexistent"], "Missing option '--tp'"),
        (["verify", "x", "--runtime", "nope"], "'nope' is not one of"),
        (["quantize"], "Missing argument 'HF_DIR'"),
        (["nosuchcommand"], "No such command 'nosuchcommand'"),
    ],
)
def test_a_usage_error_is_one_error_line(args, named):
    result = CliRunner().invoke(main, args, prog_name="builder")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2
    assert len(lines) == 1 and lines[0].startswith("error: builder") and named in lines[0]
    assert "Usage:" not in result.output and "Traceback" not in result.output


def test_no_arguments_print_the_overview_and_exit_2():
    result = CliRunner().invoke(main, [])
    assert result.exit_code == 2 and "Pipeline" in result.stdout


def test_exit_codes_of_commands_pass_through():
    assert CliRunner().invoke(main, ["--version"]).exit_code == 0
    fits = CliRunner().invoke(main, ["plan", "--preset", "ultra-253b", "--target", "h100x4-fp8"])
    split = CliRunner().invoke(
        main, ["plan", "--preset", "ultra-253b", "--target", "h100x4-fp8", "--tp", "2"]
    )
    assert (fits.exit_code, split.exit_code) == (0, 1)
