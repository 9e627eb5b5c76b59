"""Pure FP8 rules: scales from amax, the two exporters' rounding, amax checks, the amax table."""

from __future__ import annotations

import math

import pytest
import torch

from builder.arch import preset_plan
from builder.quantize.amax import AmaxError, AmaxTable, expected_keys, layer_linears, require_amax
from builder.quantize.fp8 import (
    E4M3_MAX,
    check_amax,
    kv_cache_scale,
    quantize_hf,
    quantize_trtllm,
    scale_from_amax,
    trtllm_scale,
)

# Numeric comparisons run on one torch thread, so summation order does not depend on the
# machine's core count (see one_torch_thread in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_scale_is_fp32_amax_over_448():
    amax = float(torch.tensor(3.3750, dtype=torch.bfloat16))
    scale = scale_from_amax(amax)
    assert scale.dtype == torch.float32 and scale.shape == ()
    assert scale.item() == (torch.tensor(amax, dtype=torch.float32) / 448.0).item()
    assert trtllm_scale(amax).shape == (1,)


@pytest.mark.parametrize(
    ("k", "v", "expected"),
    [(0.5, 0.6, 1.0), (448.0 * 2, 10.0, 2.0), (10.0, 448.0 * 3, 3.0)],
)
def test_kv_cache_scale_is_max_over_k_v_with_floor_one(k, v, expected):
    scale = kv_cache_scale(k, v)
    assert scale.shape == (1,) and scale.dtype == torch.float32
    assert scale.item() == pytest.approx(expected)


def test_hf_rounds_in_bf16_trtllm_in_fp32():
    weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    scale = scale_from_amax(float(weight.abs().max()))
    hf, trt = quantize_hf(weight, scale), quantize_trtllm(weight, scale)
    assert hf.dtype == trt.dtype == torch.float8_e4m3fn
    assert hf.float().abs().max() <= E4M3_MAX and trt.float().abs().max() <= E4M3_MAX
    in_bf16 = (weight / scale.reshape(())).to(torch.float8_e4m3fn)
    in_fp32 = (weight.float() / scale).to(torch.float8_e4m3fn)
    assert hf.view(torch.uint8).equal(in_bf16.view(torch.uint8))
    assert trt.view(torch.uint8).equal(in_fp32.view(torch.uint8))
    assert not hf.view(torch.uint8).equal(trt.view(torch.uint8))  # the double rounding shows


@pytest.mark.parametrize(
    ("amax", "problem"),
    [
        (None, "no amax"),
        (math.nan, "NaN or infinite"),
        (math.inf, "NaN or infinite"),
        (0.0, "all-zero"),
    ],
)
def test_unusable_amax_is_named(amax, problem):
    assert problem in check_amax(amax, "layer 3: q_proj")
    assert check_amax(1.5, "x") is None
    with pytest.raises(AmaxError, match=f"layer 3: .*{problem}"):
        require_amax({"model.layers.3.self_attn.q_proj.input_quantizer": amax}, "layer 3")


def test_expected_quantizers_per_block_kind():
    plan = preset_plan("mixed")
    kinds = {(lay.attention.value, lay.ffn.value): lay for lay in plan.layers}
    attention = kinds[("attention", "mlp")]
    keys = expected_keys(plan, attention, kv_cache=True)
    assert len(keys) == 7 * 2 + 2
    assert f"model.layers.{attention.index}.self_attn.k_bmm_quantizer" in keys
    assert len(expected_keys(plan, attention, kv_cache=False)) == 14
    linear = kinds[("linear", "linear")]
    assert layer_linears(plan, linear) == [
        f"model.layers.{linear.index}.self_attn.linear_attn",
        f"model.layers.{linear.index}.mlp.linear_mlp",
    ]
    empty = next(lay for lay in plan.layers if lay.is_empty)
    assert expected_keys(plan, empty, kv_cache=True) == []


def test_table_validation_and_round_trip(tmp_path):
    plan = preset_plan("mixed")
    table = AmaxTable(kv_cache=True)
    for layer in plan.layers:
        table.update({key: 0.125 * (1 + layer.index) for key in expected_keys(plan, layer, True)})
    table.validate(plan)
    table.save(tmp_path / "amax.json")
    again = AmaxTable.load(tmp_path / "amax.json")
    assert again.values == table.values and again.kv_cache
    per_layer = table.per_layer()
    assert per_layer["layer 0"]["self_attn.q_proj.weight"] == 0.125
    missing = dict(table.values)
    missing.pop("model.layers.1.mlp.down_proj.input_quantizer")
    with pytest.raises(
        AmaxError,
        match=(
            r"layer 1: model.layers.1.mlp.down_proj.input_quantizer: "
            r"enabled quantizer has no amax"
        ),
    ):
        AmaxTable(missing).validate(plan)
