"""Bad input: a clear error (exit 2 from the CLI), and nothing written that looks complete."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from builder.cli import main
from builder.errors import UserError
from builder.io.checkpoint import HFCheckpoint
from builder.quantize import blockwise
from builder.quantize.amax import AmaxError
from builder.quantize.blockwise import NonFiniteActivations
from builder.quantize.pipeline import quantize_checkpoint

SMALL = ["--calib-size", "2", "--calib-seq-len", "16"]


def run_cli(*args: str):
    return CliRunner().invoke(main, ["quantize", *args])


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not out.with_name(f".{out.name}.partial").exists()


def copy_with(src: Path, dst: Path, name: str, change) -> Path:
    """A copy of checkpoint `src` whose tensor `name` is replaced by change(tensor)."""
    shutil.copytree(src, dst)
    file = HFCheckpoint(dst).info(name).file
    tensors = load_file(file)
    tensors[name] = change(tensors[name])
    save_file(tensors, str(file), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "the calibration data is empty"), ("just a few words", "too short")],
)
def test_empty_or_short_data(tmp_path, mixed_ckpt, content, message):
    data = tmp_path / "data.txt"
    data.write_text(content)
    out = tmp_path / "out"
    result = run_cli(str(mixed_ckpt), str(out), "--calib", str(data), *SMALL)
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output
    assert_nothing_written(out)


def test_unreadable_data_file(tmp_path, mixed_ckpt):
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"text": "\xff\xfe broken"}\n')
    out = tmp_path / "out"
    result = run_cli(str(mixed_ckpt), str(out), "--calib", str(data), *SMALL)
    assert result.exit_code == 2 and "data.jsonl: unreadable" in result.output
    assert_nothing_written(out)


def test_already_quantized_checkpoint_is_refused(tmp_path, mixed_ckpt):
    first = tmp_path / "fp8"
    assert run_cli(str(mixed_ckpt), str(first), "--format", "hf", *SMALL).exit_code == 0
    out = tmp_path / "again"
    result = run_cli(str(first / "hf"), str(out), *SMALL)
    assert result.exit_code == 2 and "already quantized" in result.output
    assert_nothing_written(out)
    fp8_weights = copy_with(
        mixed_ckpt,
        tmp_path / "fp8-weights",
        "model.layers.0.mlp.down_proj.weight",
        lambda t: t.to(torch.float8_e4m3fn),
    )
    result = run_cli(str(fp8_weights), str(out), *SMALL)
    assert (
        result.exit_code == 2
        and "'model.layers.0.mlp.down_proj.weight' is torch.float8_e4m3fn" in result.output
    )


def test_impossible_tp_fails_before_calibration(tmp_path, mixed_ckpt):
    out = tmp_path / "out"
    result = run_cli(str(mixed_ckpt), str(out), "--tp", "3", *SMALL)
    assert result.exit_code == 2 and "tp=3" in result.output
    assert_nothing_written(out)


def test_enabled_quantizer_without_amax(tmp_path, mixed_ckpt, monkeypatch):
    """A forward loop that never reaches the block leaves ModelOpt's input quantizers empty."""
    monkeypatch.setattr(blockwise, "run_block", lambda layer, hidden, inputs: None)
    out = tmp_path / "out"
    with pytest.raises(
        AmaxError,
        match=(
            r"layer 0: model.layers.0.self_attn.q_proj.input_quantizer: enabled quantizer has no "
            r"amax"
        ),
    ):
        quantize_checkpoint(mixed_ckpt, out, calib_size=2, calib_seq_len=16)
    assert_nothing_written(out)


def test_nan_activations_name_the_layer(tmp_path, mixed_ckpt):
    # Finite weights whose product overflows bf16: the activations become Inf, then NaN.
    huge = copy_with(
        mixed_ckpt,
        tmp_path / "huge",
        "model.layers.1.mlp.down_proj.weight",
        lambda t: torch.full_like(t, 3e38),
    )
    out = tmp_path / "out"
    with pytest.raises(
        NonFiniteActivations, match="layer 1: calibration batch 0 produced NaN or Inf"
    ):
        quantize_checkpoint(huge, out, calib_size=2, calib_seq_len=16)
    assert_nothing_written(out)
    result = run_cli(str(huge), str(out), *SMALL)
    assert result.exit_code == 2 and "layer 1" in result.output


def test_nan_weight_names_the_tensor(tmp_path, mixed_ckpt):
    def poison(t):
        t = t.clone()
        t[3, 5] = float("nan")
        return t

    bad = copy_with(
        mixed_ckpt, tmp_path / "nan", "model.layers.2.self_attn.linear_attn.weight", poison
    )
    out = tmp_path / "out"
    result = run_cli(str(bad), str(out), *SMALL)
    assert result.exit_code == 2
    assert "model.layers.2.self_attn.linear_attn.weight" in result.output and "NaN" in result.output
    assert_nothing_written(out)


# ---- hardening: one `error:` line, exit 2, the source untouched --------------------------------
def one_error_line(result) -> str:
    """The single `error:` line on stderr (progress lines may precede it), exit 2."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


def tree_hash(root: Path) -> dict[str, str]:
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("where", ["the source", "the source's parent", "inside the source"])
def test_output_over_the_input_is_refused_and_the_source_kept(tmp_path, mixed_ckpt, where):
    src = Path(shutil.copytree(mixed_ckpt, tmp_path / "src"))
    out = {"the source": src, "the source's parent": tmp_path, "inside the source": src / "fp8"}[
        where
    ]
    before = tree_hash(tmp_path)
    line = one_error_line(run_cli(str(src), str(out), "--overwrite", *SMALL))
    assert f"{out}: the output" in line and f"the input {src}" in line
    assert tree_hash(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_output_on_a_read_only_filesystem(tmp_path, mixed_ckpt, monkeypatch):
    """Permission bits do not stop root: creating under `ro` fails at os.mkdir with EROFS,
    as on a read-only mount (the staging directory is the first thing a run creates)."""
    import errno
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if Path(path).absolute().is_relative_to(ro):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    line = one_error_line(run_cli(str(mixed_ckpt), str(ro / "out"), *SMALL))
    assert line == f"error: {ro / '.out.partial'}: Read-only file system"
    assert not list(ro.iterdir())


class Crash(Exception):
    """Stands for kill -9 in the middle of calibration."""


def test_truncated_activation_cache_on_resume(tmp_path, mixed_ckpt, monkeypatch):
    real = blockwise.calibrate_block
    calls = {"n": 0}

    def crash_after_three(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise Crash
        return real(*args, **kwargs)

    monkeypatch.setattr(blockwise, "calibrate_block", crash_after_three)
    out = tmp_path / "out"
    result = run_cli(str(mixed_ckpt), str(out), "--format", "hf", "--save-every", "1", *SMALL)
    assert isinstance(
        result.exception, Crash
    )  # a bug, not bad input: not turned into an error line
    cache = tmp_path / ".out.calib" / "inputs-rank0.safetensors"
    assert cache.is_file()
    monkeypatch.setattr(blockwise, "calibrate_block", real)
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    line = one_error_line(run_cli(str(mixed_ckpt), str(out), "--format", "hf", "--resume", *SMALL))
    assert (
        f"error: {cache}: saved calibration state is unusable (unreadable safetensors file" in line
    )
    assert "without --resume" in line
    assert_nothing_written(out)
    state = tmp_path / ".out.calib" / "state.json"
    state.write_text('{"version": 1, "next_layer": "four"}')
    line = one_error_line(run_cli(str(mixed_ckpt), str(out), "--format", "hf", "--resume", *SMALL))
    assert (
        f"{state}: saved calibration state is unusable (next_layer: expected integer >= 0" in line
    )


def test_output_that_is_a_regular_file_is_not_replaced(tmp_path, mixed_ckpt):
    """One error line, as from convert (check_replaceable), before anything runs."""
    out = tmp_path / "out"
    out.write_text("my notes")
    line = one_error_line(run_cli(str(mixed_ckpt), str(out), "--overwrite", *SMALL))
    assert line.startswith(f"error: {out}: is a file, not a directory")
    assert out.read_text() == "my notes"
    with pytest.raises(UserError, match="is a file, not a directory"):
        quantize_checkpoint(mixed_ckpt, out, overwrite=True, calib_size=2, calib_seq_len=16)
    assert out.read_text() == "my notes" and not (tmp_path / ".out.partial").exists()


def test_a_second_run_on_the_same_out_is_refused(tmp_path, mixed_ckpt, monkeypatch):
    """Another process holds OUT's stage lock (a running quantize or convert): refused,
    naming it, before any calibration; its staging directory is left alone."""
    import os
    import subprocess
    import sys

    from builder.io import atomic

    monkeypatch.setattr(atomic, "LOCK_WAIT_SECONDS", 0.3)
    out = tmp_path / "out"
    holder = (
        "import sys, time\nfrom builder.io.atomic import lock_stage\nwith "
        "lock_stage(sys.argv[1]):\n"
        "    print('locked', flush=True)\n    time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    other = subprocess.Popen(
        [sys.executable, "-c", holder, str(out)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert other.stdout.readline() == "locked\n"
        line = one_error_line(run_cli(str(mixed_ckpt), str(out), *SMALL))
        assert f"another run is writing this output (pid {other.pid}:" in line
        assert (tmp_path / ".out.partial").is_dir()  # the other run's, untouched
    finally:
        other.kill()
        other.wait(30)


def test_export_cast_that_changes_a_weight_is_an_error(tmp_path, mixed_ckpt):
    """--dtype float16: the final norm (kept unquantized, cast to the model dtype) holds a
    finite bf16 value that float16 cannot hold; named, and no output appears."""

    def poison(t):
        t = t.clone()
        t[7] = 99840.0
        return t

    bad = copy_with(mixed_ckpt, tmp_path / "big", "model.norm.weight", poison)
    out = tmp_path / "out"
    line = one_error_line(
        run_cli(str(bad), str(out), "--dtype", "float16", "--format", "hf", *SMALL)
    )
    assert "'model.norm.weight' holds 99840 at element 7, which overflows float16" in line
    assert_nothing_written(out)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: [c], "config.json: expected an object, got an array of 1"),
        (lambda c: c | {"hidden_size": "256"}, 'hidden_size: expected integer >= 1, got "256"'),
        (lambda c: c | {"quantization_config": "fp8"}, "already quantized (quantization_config"),
    ],
    ids=["config not an object", "numeric field as a string", "quantization_config a string"],
)
def test_bad_config_is_one_error_line(tmp_path, mixed_ckpt, change, message):
    """quantize reads config.json through the same schema as convert, before anything else
    looks into it (a JSON array used to reach refuse_quantized's dict lookups)."""
    import json

    src = Path(shutil.copytree(mixed_ckpt, tmp_path / "src"))
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(change(config)))
    before = tree_hash(src)
    out = tmp_path / "out"
    line = one_error_line(run_cli(str(src), str(out), *SMALL))
    assert str(src / "config.json") in line and message in line
    assert_nothing_written(out)
    assert tree_hash(src) == before
