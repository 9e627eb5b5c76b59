"""`builder plan` and `builder build` as a new user meets them: exit codes, headers that follow
the overrides, engines inside OUT, advice that names the command that made the checkpoint."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from builder.cli import main
from builder.deploy import load_profile


def run(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


# ---- plan ---------------------------------------------------------------------------------------
def test_plan_exit_codes_follow_the_verdict():
    fits = run("plan", "--preset", "ultra-253b", "--target", "h100x4-fp8")
    assert fits.exit_code == 0, fits.output
    assert "h100x4-fp8: fits" in fits.output
    too_small = run("plan", "--preset", "ultra-253b", "--target", "h100x4-fp8", "--tp", "2")
    assert too_small.exit_code == 1 and "does not fit" in too_small.output
    impossible = run("plan", "--preset", "ultra-253b", "--target", "h100x4-fp8", "--tp", "3")
    assert impossible.exit_code == 1 and "cannot split tp=3" in impossible.output
    as_json = run("plan", "--preset", "ultra-253b", "--target", "h100x4-fp8", "--tp", "2", "--json")
    assert as_json.exit_code == 1 and json.loads(as_json.stdout)["plans"][0]["fits"] is False
    bad = run("plan", "--preset", "ultra-253b", "--target", "no-such-target")
    assert bad.exit_code == 2 and bad.output.startswith("error:")


def test_plan_help_documents_the_exit_codes():
    text = run("plan", "--help").output
    assert "0  every target fits" in text and "1  some target does not fit" in text
    assert "2  bad input" in text


def test_plan_header_follows_the_tp_override_and_decode_row_says_why():
    result = run("plan", "--preset", "ultra-253b", "--target", "h100x4-fp8", "--tp", "2")
    header = " ".join(result.output.split("\n")[:3])
    assert "TP2" in header and "TP4" not in header
    assert "batch 0" not in result.output and "= 0 tok/s" not in result.output
    assert "no memory left for a KV" in result.output


# ---- build --------------------------------------------------------------------------------------
def test_tp_override_carries_to_workers():
    assert load_profile("h100x8-bf16").build.workers == 8
    assert load_profile("h100x8-bf16", [("parallel.tp", 2)]).build.workers == 2
    assert (
        load_profile("h100x8-bf16", [("parallel.tp", 4), ("build.workers", 1)]).build.workers == 1
    )


def test_dry_run_writes_engines_inside_out_and_workers_follow_tp(trtllm_bf16, tmp_path):
    out = tmp_path / "dry"
    result = run(
        "build", trtllm_bf16, out, "--target", "h100x8-bf16", "--tp", "2", "--dry-run", "--json"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    command = report["command"]
    assert command[command.index("--output_dir") + 1] == str(out.resolve())
    assert command[command.index("--workers") + 1] == "2"
    assert f"ENGINE_DIR:-{out.resolve()}}}" in (out / "launch" / "build-engines.sh").read_text()
    assert not (tmp_path / "dry-engine").exists()


def test_fp8_tp_mismatch_names_quantize(trtllm_fp8, tmp_path):
    result = run("build", trtllm_fp8, tmp_path / "dry", "--target", "h100x4-fp8", "--dry-run")
    assert result.exit_code == 2
    assert "builder quantize HF_DIR OUT --tp 4" in result.output
    assert "convert again" not in result.output


def test_bf16_tp_mismatch_names_convert(trtllm_bf16, tmp_path):
    result = run("build", trtllm_bf16, tmp_path / "dry", "--target", "h100x8-bf16", "--dry-run")
    assert result.exit_code == 2 and "builder convert HF_DIR OUT --tp 8" in result.output


@pytest.mark.parametrize("backend", ["engine", "pytorch"])
def test_launch_scripts_store_absolute_paths(
    backend, trtllm_bf16, mixed_ckpt, tmp_path, monkeypatch
):
    """Relative paths given on the command line become absolute, resolved ones in scripts."""
    monkeypatch.chdir(tmp_path)
    source = trtllm_bf16 if backend == "engine" else mixed_ckpt
    (tmp_path / "in").symlink_to(source)
    args = ["build", "in", "out", "--target", "h100x8-bf16", "--tp", "2", "--backend", backend]
    result = run(*args, *(["--dry-run"] if backend == "engine" else []))
    assert result.exit_code == 0, result.output
    text = "".join(p.read_text() for p in sorted((tmp_path / "out" / "launch").iterdir()))
    paths = [
        line.split(":-", 1)[1].rstrip('}"')
        for line in text.splitlines()
        if line.split("=")[0] in {"CKPT_DIR", "ENGINE_DIR", "TOKENIZER_DIR", "MODEL_DIR", "OPTIONS"}
    ]
    assert paths and all(p.startswith("/") for p in paths), paths
    assert str(source.resolve()) in text
