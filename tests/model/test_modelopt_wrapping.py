"""ModelOpt FP8 + FP8-KV quantization wraps the reference model (a smoke test for `quantize`)."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from builder.model import load_reference_model

mtq = pytest.importorskip("modelopt.torch.quantization")


def fp8_with_kv_config() -> dict:
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the merged config
        return mtq.update_quant_cfg_with_kv_cache_quant(
            mtq.FP8_DEFAULT_CFG, mtq.FP8_KV_CFG["quant_cfg"]
        )


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_fp8_kv_quantizers_attach_and_calibrate(mixed_ckpt, impl):
    model = load_reference_model(mixed_ckpt, dtype=torch.bfloat16, attn_implementation=impl)
    ids = torch.randint(
        0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    with contextlib.redirect_stdout(io.StringIO()):
        mtq.quantize(model, fp8_with_kv_config(), lambda m: m(ids, use_cache=False))
    for layer, block in zip(model.plan.layers, model.model.layers, strict=True):
        attention = block.self_attn
        if layer.attention.value == "attention":
            for quantizer in (attention.k_bmm_quantizer, attention.v_bmm_quantizer):
                assert quantizer.is_enabled and quantizer.amax is not None
                assert torch.isfinite(quantizer.amax).all() and quantizer.amax.item() > 0
            assert attention.q_proj.input_quantizer.amax.item() > 0
        elif layer.attention.value == "linear":
            # A replacing linear is quantized like any linear but gets no KV quantizers.
            assert not hasattr(attention, "k_bmm_quantizer")
            assert attention.linear_attn.input_quantizer.amax.item() > 0
        else:
            assert attention is None
    with torch.no_grad():
        quantized = model(ids, use_cache=False).logits
    assert torch.isfinite(quantized).all()
