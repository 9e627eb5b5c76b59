"""Bad input: a clear error (exit 2 from the CLI), and nothing written that looks complete."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from builder.cli import main
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
        mixed_ckpt, tmp_path / "fp8-weights", "model.layers.0.mlp.down_proj.weight",
        lambda t: t.to(torch.float8_e4m3fn),
    )
    result = run_cli(str(fp8_weights), str(out), *SMALL)
    assert result.exit_code == 2 and "'model.layers.0.mlp.down_proj.weight' is torch.float8_e4m3fn" in result.output


def test_impossible_tp_fails_before_calibration(tmp_path, mixed_ckpt):
    out = tmp_path / "out"
    result = run_cli(str(mixed_ckpt), str(out), "--tp", "3", *SMALL)
    assert result.exit_code == 2 and "tp=3" in result.output
    assert_nothing_written(out)


def test_enabled_quantizer_without_amax(tmp_path, mixed_ckpt, monkeypatch):
    """A forward loop that never reaches the block leaves ModelOpt's input quantizers empty."""
    monkeypatch.setattr(blockwise, "run_block", lambda layer, hidden, inputs: None)
    out = tmp_path / "out"
    with pytest.raises(AmaxError, match=r"layer 0: model.layers.0.self_attn.q_proj.input_quantizer: enabled quantizer has no amax"):
        quantize_checkpoint(mixed_ckpt, out, calib_size=2, calib_seq_len=16)
    assert_nothing_written(out)


def test_nan_activations_name_the_layer(tmp_path, mixed_ckpt):
    # Finite weights whose product overflows bf16: the activations become Inf, then NaN.
    huge = copy_with(
        mixed_ckpt, tmp_path / "huge", "model.layers.1.mlp.down_proj.weight",
        lambda t: torch.full_like(t, 3e38),
    )
    out = tmp_path / "out"
    with pytest.raises(NonFiniteActivations, match="layer 1: calibration batch 0 produced NaN or Inf"):
        quantize_checkpoint(huge, out, calib_size=2, calib_seq_len=16)
    assert_nothing_written(out)
    result = run_cli(str(huge), str(out), *SMALL)
    assert result.exit_code == 2 and "layer 1" in result.output


def test_nan_weight_names_the_tensor(tmp_path, mixed_ckpt):
    def poison(t):
        t = t.clone()
        t[3, 5] = float("nan")
        return t

    bad = copy_with(mixed_ckpt, tmp_path / "nan", "model.layers.2.self_attn.linear_attn.weight", poison)
    out = tmp_path / "out"
    result = run_cli(str(bad), str(out), *SMALL)
    assert result.exit_code == 2
    assert "model.layers.2.self_attn.linear_attn.weight" in result.output and "NaN" in result.output
    assert_nothing_written(out)
