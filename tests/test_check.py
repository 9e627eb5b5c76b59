"""`builder check` on every artifact kind builder writes, through the CLI: what it says it
checked, and that a seeded non-finite value or a missing/zero FP8 scale fails naming the tensor."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from builder.cli import main
from builder.io.manifest import build_manifest, read_manifest, write_manifest
from builder.io.safetensors_stream import read_header
from builder.quantize.pipeline import quantize_checkpoint

NAN_BITS = {
    "BF16": struct.pack("<H", 0x7FC0),
    "F32": struct.pack("<f", float("nan")),
    "F8_E4M3": bytes([0x7F]),
}


def run(*args):
    return CliRunner().invoke(main, ["check", *[str(a) for a in args]])


def ok_line(result) -> str:
    assert result.exit_code == 0, result.output
    return next(line for line in result.stdout.splitlines() if line.startswith("ok "))


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def reseal(directory: Path) -> None:
    """Rewrite the manifest after tampering, so only the content checks can notice."""
    old = read_manifest(directory)
    fields = {k: v for k, v in old.items() if k not in ("files", "kind", "tool", "created")}
    write_manifest(directory, build_manifest(directory, old["kind"], **fields))


def seed_nan(file: Path, name: str) -> None:
    """Overwrite the first element of tensor `name` in place with NaN."""
    start, header = read_header(file)
    entry = header[name]
    with open(file, "r+b") as handle:
        handle.seek(start + entry["data_offsets"][0])
        handle.write(NAN_BITS[entry["dtype"]])


def rewrite(file: Path, change) -> None:
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, mixed_ckpt):
    out = tmp_path_factory.mktemp("check") / "mixed-fp8"
    quantize_checkpoint(mixed_ckpt, out, tp=2, calib_size=4, calib_seq_len=16, batch_size=4)
    return out


# ---- what it says it checked ---------------------------------------------------------------------
def test_synth_checkpoint(mixed_ckpt):
    line = ok_line(run(mixed_ckpt))
    assert "hf-checkpoint, bfloat16, FP8 no, KV cache bfloat16" in line
    files = len(read_manifest(mixed_ckpt)["files"])
    assert f"{files} files (digests)" in line and "all finite" in line


def test_imported_smollm2(smollm2_ckpt):
    line = ok_line(run(smollm2_ckpt))
    assert "hf-checkpoint, float32, FP8 no" in line and "273 tensors" in line


def test_quantize_root_checks_both_exports(quantized):
    result = run(quantized, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (
        report["kind"] == "fp8-quantization"
        and report["fp8"] is True
        and report["kv_cache"] == "fp8"
    )
    kinds = {Path(p["directory"]).name: p for p in report["parts"]}
    assert set(kinds) == {"trtllm", "hf"}
    assert kinds["trtllm"]["kind"] == "trtllm-checkpoint" and kinds["trtllm"]["tp"] == 2
    assert kinds["hf"]["kind"] == "hf-fp8-checkpoint" and kinds["hf"]["scales_checked"] > 0
    assert all(p["finite_checked"] for p in report["parts"])
    line = ok_line(run(quantized))
    assert "trtllm/: trtllm-checkpoint tp=2 pp=1" in line and "hf/: hf-fp8-checkpoint" in line


def test_hf_fp8_export(quantized):
    line = ok_line(run(quantized / "hf"))
    assert "hf-fp8-checkpoint" in line and "FP8 yes, KV cache fp8" in line and "scales > 0" in line


def test_trtllm_bf16_and_fp8(quantized, tmp_path, mixed_ckpt):
    line = ok_line(run(quantized / "trtllm"))
    assert "trtllm-checkpoint tp=2 pp=1" in line and "FP8 yes, KV cache fp8" in line
    bf16 = tmp_path / "bf16"
    assert (
        CliRunner()
        .invoke(main, ["convert", str(mixed_ckpt), str(bf16), "--tp", "2", "--json"])
        .exit_code
        == 0
    )
    assert "FP8 no, KV cache bfloat16" in ok_line(run(bf16))


def test_quick_skips_hashes_and_scan(mixed_ckpt):
    line = ok_line(run(mixed_ckpt, "--quick"))
    assert "(sizes)" in line and "all finite" not in line


# ---- failures name the tensor --------------------------------------------------------------------
def test_nan_in_hf_checkpoint_is_named(mixed_ckpt, tmp_path):
    ckpt = copy(mixed_ckpt, tmp_path / "nan")
    shard = next(ckpt.glob("model-*.safetensors"))
    seed_nan(shard, "model.layers.0.mlp.up_proj.weight")
    reseal(ckpt)
    result = run(ckpt)
    assert result.exit_code == 2
    assert "tensor 'model.layers.0.mlp.up_proj.weight' holds 1 non-finite value(s)" in result.output


@pytest.mark.parametrize("part", ["trtllm", "hf"])
def test_nan_in_fp8_export_is_named(quantized, tmp_path, part):
    root = copy(quantized, tmp_path / "q")
    target = root / part
    file = min(target.glob("*.safetensors"))
    name = next(
        n
        for n, e in read_header(file)[1].items()
        if n != "__metadata__" and e["dtype"] == "F8_E4M3"
    )
    seed_nan(file, name)
    reseal(target)
    reseal(root)
    result = run(root)
    assert result.exit_code == 2 and f"tensor {name!r} holds 1 non-finite value(s)" in result.output


def test_missing_scale_in_hf_fp8_export_is_named(quantized, tmp_path):
    hf = copy(quantized / "hf", tmp_path / "hf")
    name = "model.layers.0.self_attn.o_proj.weight_scale"
    rewrite(hf / "model.safetensors", lambda t: t.pop(name))
    reseal(hf)
    result = run(hf)
    assert result.exit_code == 2 and f"tensor {name!r} is missing" in result.output


def test_zero_scale_in_trtllm_fp8_is_named(quantized, tmp_path):
    ckpt = copy(quantized / "trtllm", tmp_path / "trtllm")
    name = "transformer.layers.0.attention.dense.weights_scaling_factor"
    rewrite(ckpt / "rank0.safetensors", lambda t: t.__setitem__(name, torch.zeros(1)))
    reseal(ckpt)
    result = run(ckpt)
    assert result.exit_code == 2 and f"scale {name!r} is not positive" in result.output


def test_missing_scale_in_trtllm_fp8_is_named(quantized, tmp_path):
    ckpt = copy(quantized / "trtllm", tmp_path / "trtllm")
    name = "transformer.layers.0.attention.qkv.activation_scaling_factor"
    rewrite(ckpt / "rank1.safetensors", lambda t: t.pop(name))
    reseal(ckpt)
    result = run(ckpt)
    assert result.exit_code == 2 and f"tensor {name!r} is missing" in result.output


def test_hf_quant_config_disagreeing_with_config_json(quantized, tmp_path):
    hf = copy(quantized / "hf", tmp_path / "hf")
    path = hf / "hf_quant_config.json"
    declared = json.loads(path.read_text())
    declared["quantization"]["kv_cache_quant_algo"] = None
    path.write_text(json.dumps(declared))
    reseal(hf)
    result = run(hf)
    assert (
        result.exit_code == 2
        and "kv_cache_scheme disagrees with hf_quant_config.json" in result.output
    )


def test_tampered_quantize_root_file_is_found(quantized, tmp_path):
    root = copy(quantized, tmp_path / "q")
    data = bytearray((root / "amax.json").read_bytes())
    data[-2] = ord(" ") if data[-2] != ord(" ") else ord("\n")  # same size, other bytes
    (root / "amax.json").write_bytes(bytes(data))
    result = run(root)
    assert result.exit_code == 2 and "amax.json: blake3 differs" in result.output


def test_build_output_manifest_is_checked(quantized, tmp_path):
    out = tmp_path / "dry"
    built = CliRunner().invoke(
        main,
        [
            "build",
            str(quantized / "trtllm"),
            str(out),
            "--target",
            "h100x4-fp8",
            "--tp",
            "2",
            "--dry-run",
        ],
    )
    assert built.exit_code == 0, built.output
    assert "trtllm-build-dry-run" in ok_line(run(out))
    (out / "launch" / "serve.sh").write_text("#!/bin/sh\n")
    tampered = run(out)
    assert tampered.exit_code == 2 and "launch/serve.sh: size" in tampered.output
