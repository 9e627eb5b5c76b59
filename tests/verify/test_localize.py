"""Broken FP8 artifacts fail with exit 1, and localization names the part and the tensor.

A 26-block slice of Ultra's pattern (every block kind, FFN widths from 125 to 5 x hidden)
quantized at tp=2; each test breaks a copy the way real artifacts break.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from builder.arch import load_plan
from builder.arch.plan import AttentionKind, FfnKind
from builder.cli import main
from builder.verify.golden import Golden, GoldenSettings, build_golden
from builder.verify.localize import localize, tensor_checks
from builder.verify.run import VerifyOptions, verify
from builder.verify.runtimes import RuntimeArgs, make_runtime

# Synthetic random weights: accuracy limits are not the point here, localization is.
LOOSE = "[verify]\nkl_mean_max = 10.0\ntop1_agreement_min = 0.0\n"


@pytest.fixture(scope="module")
def ultra_fp8(tmp_path_factory, ultra_ckpt):
    from builder.quantize.pipeline import quantize_checkpoint

    out = tmp_path_factory.mktemp("fp8") / "ultra-fp8"
    quantize_checkpoint(ultra_ckpt, out, tp=2, calib_size=4, calib_seq_len=32, dtype="float32")
    return out


@pytest.fixture(scope="module")
def ultra_golden(tmp_path_factory, ultra_ckpt):
    from builder.quantize.calib import calib_dir

    settings = GoldenSettings(
        prompts="wiki",
        windows=2,
        seq_len=32,
        continuation=4,
        probe_len=16,
        dtype="float32",
        tasks=str(calib_dir() / "tasks-sample.jsonl"),
        task_max_tokens=3,
        task_reasoning_max_tokens=3,
    )
    return build_golden(ultra_ckpt, tmp_path_factory.mktemp("golden") / "ultra", settings)


@pytest.fixture(scope="module")
def thresholds(tmp_path_factory):
    path = tmp_path_factory.mktemp("t") / "loose.toml"
    path.write_text(LOOSE)
    return path


@pytest.fixture(scope="module")
def ffn_block(ultra_ckpt):
    """The widest FFN-only block (no attention): what a 'block 37 (ffn, width 26624)' looks like."""
    plan = load_plan(ultra_ckpt)
    blocks = [b for b in plan.layers if b.ffn is FfnKind.MLP and b.attention is AttentionKind.NO_OP]
    return max(blocks, key=lambda b: b.ffn_width)


def broken_copy(fp8, tmp_path, change):
    art = tmp_path / "trtllm"
    shutil.copytree(fp8 / "trtllm", art)
    change(art)
    return art


def edit_rank(art, rank: int, edit) -> None:
    path = art / f"rank{rank}.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def run_cli(art, golden, thresholds, report):
    args = [
        "verify",
        str(art),
        "--golden",
        str(golden),
        "--runtime",
        "executor",
        "--localize",
        "--thresholds",
        str(thresholds),
        "--report",
        str(report),
    ]
    return CliRunner().invoke(main, args)


def test_the_intact_artifact_has_no_part_out_of_line(ultra_fp8, ultra_golden, thresholds, tmp_path):
    result = run_cli(ultra_fp8 / "trtllm", ultra_golden, thresholds, tmp_path)
    assert result.exit_code == 0, result.output
    assert "no part out of line" in result.output
    assert "| task_accuracy |" in result.output and "| golden_task_accuracy |" in result.output
    assert "| task_accuracy_reasoning_on |" in result.output


def test_a_corrupted_scaling_factor_is_named(
    ultra_fp8, ultra_golden, thresholds, ffn_block, tmp_path
):
    name = f"transformer.layers.{ffn_block.index}.ffn.proj.weights_scaling_factor"

    def corrupt(art):
        edit_rank(art, 1, lambda t: t.__setitem__(name, t[name] * 8))

    art = broken_copy(ultra_fp8, tmp_path, corrupt)
    result = run_cli(art, ultra_golden, thresholds, tmp_path / "report")
    assert result.exit_code == 1, result.output
    label = f"block {ffn_block.index} (ffn, width {ffn_block.ffn_width})"
    line = next(x for x in result.output.splitlines() if x.startswith(f"- {label}: output error"))
    assert (
        f"{name} (rank 1) = " in line
        and "is 8x what the calibrated weight amax/448 implies" in line
    )
    assert "rank1.safetensors: blake3 differs from the manifest" in result.output


def test_swapped_rank_files_are_named(ultra_fp8, ultra_golden, thresholds, tmp_path):
    def swap(art):
        (art / "rank0.safetensors").rename(art / "tmp")
        (art / "rank1.safetensors").rename(art / "rank0.safetensors")
        (art / "tmp").rename(art / "rank1.safetensors")

    art = broken_copy(ultra_fp8, tmp_path, swap)
    result = run_cli(art, ultra_golden, thresholds, tmp_path / "report")
    assert result.exit_code == 1, result.output
    assert (
        "rank0.safetensors holds the bytes the manifest records for rank1.safetensors"
        in result.output
    )
    # Row-parallel partial sums commute, so every block still computes the same; only the
    # vocabulary-parallel lm_head (gathered in rank order) is wrong, and it is named.
    line = next(x for x in result.output.splitlines() if x.startswith("- lm_head: output error"))
    assert "lm_head.weight (rank 0) is" in line and "away from the source weights" in line


def test_a_replaced_block_weight_is_named(ultra_fp8, ultra_golden, ffn_block, tmp_path):
    name = f"transformer.layers.{ffn_block.index}.ffn.fc.weight"

    def replace(art):
        def edit(t):
            g = torch.Generator().manual_seed(0)
            t[name] = (
                (torch.randn(t[name].shape, generator=g) * 100)
                .clamp(-448, 448)
                .to(torch.float8_e4m3fn)
            )

        edit_rank(art, 0, edit)

    art = broken_copy(ultra_fp8, tmp_path, replace)
    runtime = make_runtime("executor", RuntimeArgs(artifact=str(art), dtype=torch.float32))
    golden = Golden.load(ultra_golden)
    found = localize(golden, runtime.localizer(), tensor_checks(art, golden))
    label = f"block {ffn_block.index} (ffn, width {ffn_block.ffn_width})"
    assert found.worst.label() == label and [p.label() for p in found.outliers][:1] == [label]
    assert any(f.startswith(f"{name} (rank 0) is") for f in found.findings[label])
    assert all(not f for k, f in found.findings.items() if k != label)
    result = verify(ultra_golden, runtime, VerifyOptions(localize=True, report=tmp_path / "r"))
    assert result.exit_code == 1 and "localization: integrity" in result.failures[-1]


def test_an_input_scale_out_of_line_in_the_hf_export_is_named(
    ultra_fp8, ultra_golden, thresholds, ffn_block, tmp_path
):
    """The hf runtime's localizer: each block of the unified HF export alone on the golden's
    inputs, its scales checked against the amax table under the HF exporter's rules."""
    module = f"model.layers.{ffn_block.index}.mlp.down_proj"
    art = tmp_path / "hf"
    shutil.copytree(ultra_fp8 / "hf", art)
    (path,) = art.glob("*.safetensors")
    tensors = load_file(str(path))
    tensors[f"{module}.input_scale"] = tensors[f"{module}.input_scale"] * 0.05  # clips inputs
    save_file(tensors, str(path), metadata={"format": "pt"})
    runtime = make_runtime("hf", RuntimeArgs(artifact=str(art), dtype=torch.float32))
    opts = VerifyOptions(thresholds=thresholds, localize=True, report=tmp_path / "r")
    result = verify(ultra_golden, runtime, opts)
    assert result.exit_code == 1
    label = f"block {ffn_block.index} (ffn, width {ffn_block.ffn_width})"
    assert result.localization.worst.label() == label
    assert [p.label() for p in result.localization.outliers][:1] == [label]
    (finding,) = result.localization.findings[label]
    assert (
        finding.startswith(f"{module}.input_scale = ") and "is 0.05x what the calibrated" in finding
    )
    assert any("blake3 differs from the manifest" in line for line in result.localization.integrity)


def test_a_bf16_checkpoint_at_tp2_pp2_reproduces_the_golden(ultra_ckpt, ultra_golden, tmp_path):
    """The executor runtime on a plain (BF16) TensorRT-LLM checkpoint split over 2 x 2 ranks,
    computed in fp32 like the golden: the same function evaluated by other code, so only fp32
    rounding separates them (KL ~1e-10 nats, far below FP8's ~0.05), and no part is out of line
    when localization has to find each block in its pipeline stage."""
    from builder.convert.pipeline import convert_checkpoint

    out = tmp_path / "bf16"
    convert_checkpoint(ultra_ckpt, out, tp=2, pp=2)
    runtime = make_runtime("executor", RuntimeArgs(artifact=str(out), dtype=torch.float32))
    result = verify(ultra_golden, runtime, VerifyOptions(localize=True, report=tmp_path / "r"))
    assert runtime.artifact.kind == "trtllm-bf16" and runtime.artifact.details["pp"] == 2
    m = result.metrics
    assert m["kl_mean"] < 1e-6 and abs(m["ppl_ratio"] - 1) < 1e-5
    assert m["top1_agreement"] == 1.0 and m["greedy_exact_match"] == 1.0
    loc = result.localization
    assert not loc.outliers and not loc.integrity and max(p.error for p in loc.parts) < 1e-3
    assert len(loc.parts) == 2 + sum(not b.is_empty for b in load_plan(ultra_ckpt).layers)
    assert result.exit_code == 0, result.failures


def test_a_golden_of_another_model_is_bad_input(ultra_fp8, mixed_ckpt_fp32, thresholds, tmp_path):
    settings = GoldenSettings(
        prompts="wiki", windows=1, seq_len=16, continuation=0, probe_len=4, dtype="float32"
    )
    other = build_golden(mixed_ckpt_fp32, tmp_path / "golden", settings)
    result = run_cli(ultra_fp8 / "trtllm", other, thresholds, tmp_path / "report")
    assert result.exit_code == 2, result.output
    (line,) = result.output.splitlines()
    assert line.startswith(f"error: {(ultra_fp8 / 'trtllm').resolve()}: not the golden's model (")
    assert "hidden 128 (golden 256)" in line and line.endswith(
        f"is of {mixed_ckpt_fp32.resolve()})"
    )
    assert not (tmp_path / "report").exists()


def test_resident_runtime_verifies_like_the_executor(ultra_ckpt, ultra_golden, tmp_path):
    """`--runtime resident` on a tp 2 BF16 conversion, fp32 on the CPU: the executor's bounds
    above (the same ops in fp32); it cannot localize, and says so instead of failing."""
    from builder.convert.pipeline import convert_checkpoint

    out = tmp_path / "bf16"
    convert_checkpoint(ultra_ckpt, out, tp=2)
    runtime = make_runtime("resident", RuntimeArgs(artifact=str(out), dtype=torch.float32))
    said: list[str] = []
    options = VerifyOptions(localize=True, report=tmp_path / "r")
    result = verify(ultra_golden, runtime, options, said.append)
    assert runtime.artifact.kind == "trtllm-bf16" and runtime.artifact.details["tp"] == 2
    m = result.metrics
    assert m["kl_mean"] < 1e-6 and abs(m["ppl_ratio"] - 1) < 1e-5
    assert m["top1_agreement"] == 1.0 and m["greedy_exact_match"] == 1.0
    assert result.localization is None and any("cannot run blocks" in s for s in said)
    assert result.exit_code == 0, result.failures
