"""The RankTransform hook (what `builder quantize` plugs FP8 into), end to end with a toy FP8."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from builder.arch.tensors import kv_cache_scale_name, scale_names
from builder.convert import Fp8Layout, convert_checkpoint
from builder.convert.check import check_checkpoint
from builder.io.safetensors_stream import TensorSpec
from builder.runtime import TrtllmCheckpointExecutor, compare_logits, fp8_linear
from builder.runtime.compare import reference_logits

QUANT = {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]}
ACTIVATION_SCALE = 0.05  # covers |x| <= 22, enough for this seeded model's activations


class ToyFp8(Fp8Layout):
    """Per-rank-slice weight scales, a fixed activation scale: a stand-in for calibration."""

    fingerprint = "toy-fp8-v1"

    def apply(self, item, tensor):
        if not self.quantized(item):
            out = [(item.name, tensor)]
        else:
            w_scale = tensor.abs().max().float() / 448
            weight = (tensor.float() / w_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            names = scale_names(item.name)
            out = [
                (item.name, weight),
                (names[0], w_scale.reshape(1)),
                (names[1], torch.tensor([ACTIVATION_SCALE])),
            ]
        if self.kv_cache_fp8 and item.name.endswith("attention.qkv.weight"):
            out.append((kv_cache_scale_name(int(item.name.split(".")[2])), torch.tensor([0.1])))
        return out


def test_fp8_layout_specs_follow_the_reference_table():
    from builder.arch import preset_plan, rank_tensors

    items = {t.name: t for t in rank_tensors(preset_plan("ultra-253b"), 8, 1, 0)}
    layout = Fp8Layout(QUANT)
    assert layout.specs(items["transformer.layers.0.attention.qkv.weight"], torch.bfloat16) == [
        TensorSpec("transformer.layers.0.attention.qkv.weight", (2304, 16384), torch.float8_e4m3fn),
        TensorSpec(
            "transformer.layers.0.attention.qkv.weights_scaling_factor", (1,), torch.float32
        ),
        TensorSpec(
            "transformer.layers.0.attention.qkv.activation_scaling_factor", (1,), torch.float32
        ),
        TensorSpec("transformer.layers.0.attention.kv_cache_scaling_factor", (1,), torch.float32),
    ]
    assert layout.specs(items["lm_head.weight"], torch.bfloat16) == [
        TensorSpec("lm_head.weight", (16032, 16384), torch.bfloat16)
    ]
    count = sum(len(layout.specs(item, torch.bfloat16)) for item in items.values())
    assert count == 1325  # trtllm-checkpoint.md §3: FP8 weights + FP8 KV, Ultra TP8


def test_transform_output_is_written_checked_and_executed(tmp_path, mixed_ckpt_fp32):
    out = tmp_path / "fp8"
    convert_checkpoint(
        mixed_ckpt_fp32,
        out,
        tp=2,
        pp=2,
        dtype="bfloat16",
        transform=ToyFp8(QUANT),
        quantization=QUANT,
    )
    report = check_checkpoint(out)
    assert report.ok, report.problems
    with safe_open(str(out / "rank0.safetensors"), "pt") as handle:
        assert handle.get_slice("transformer.layers.0.ffn.fc.weight").get_dtype() == "F8_E4M3"
        assert torch.equal(
            handle.get_tensor("transformer.layers.0.ffn.fc.activation_scaling_factor"),
            torch.tensor([ACTIVATION_SCALE]),
        )
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(3))
    with TrtllmCheckpointExecutor(out, dtype=torch.float32) as executor:
        logits = executor(ids)
    result = compare_logits(logits, reference_logits(mixed_ckpt_fp32, ids, torch.float32))
    # FP8 noise, visible but small. Below: ten times the fp32 bound of these 12 blocks
    # ((12 * 14 + 2) roundings of 2^-24 ~ 1e-5), so FP8 did round something. Above: one
    # FP8 GEMM's rms relative error is ~ sqrt(2) * 2^-4 / sqrt(3) ~ 0.05 (weight and input
    # each rounded once, uniform errors averaging out over the dot product) and the residual
    # stream adds each block's error to an unquantized path, so the logits stay of that
    # order: 2x it. A wrong scale (missing, inverted, applied twice) is an O(1) error.
    assert 1e-4 < result.relative_error < 0.1, result


def test_a_transform_that_breaks_its_declaration_is_refused(tmp_path, mixed_ckpt):
    class Liar(ToyFp8):
        def apply(self, item, tensor):
            return super().apply(item, tensor)[:1]

    from builder.io.safetensors_stream import SafetensorsWriteError

    with pytest.raises(SafetensorsWriteError, match="but declared"):
        convert_checkpoint(
            mixed_ckpt, tmp_path / "x", tp=1, transform=Liar(QUANT), quantization=QUANT
        )
    assert not (tmp_path / "x").exists()


def test_fp8_linear_is_exact_on_the_e4m3_grid():
    gen = torch.Generator().manual_seed(0)
    w_int = torch.randint(-8, 9, (6, 16), generator=gen).float()
    x_int = torch.randint(-8, 9, (3, 16), generator=gen).float()
    w_scale, a_scale = torch.tensor([0.25]), torch.tensor([0.5])
    y = fp8_linear(x_int * a_scale, w_int.to(torch.float8_e4m3fn), w_scale, a_scale)
    assert torch.equal(y, (x_int * a_scale) @ (w_int * w_scale).T)


def test_unchanged_tensors_are_streamed_not_given_to_apply(tmp_path, mixed_ckpt):
    seen = []

    class Recording(ToyFp8):
        def apply(self, item, tensor):
            seen.append(item.name)
            return super().apply(item, tensor)

    convert_checkpoint(
        mixed_ckpt, tmp_path / "x", tp=2, transform=Recording(QUANT), quantization=QUANT
    )
    assert "transformer.layers.0.attention.qkv.weight" in seen  # FP8 weight and KV scale
    assert "transformer.layers.0.ffn.fc.weight" in seen
    assert not {
        "lm_head.weight",
        "transformer.vocab_embedding.weight",
        "transformer.ln_f.weight",
    } & set(seen)
    assert not any("layernorm" in name for name in seen)
