"""quantize_trtllm's table path writes exactly the bits of the fp32 division it replaces."""

from __future__ import annotations

import pytest
import torch

from builder.quantize.fp8 import (
    quantize_by_division,
    quantize_by_table,
    quantize_trtllm,
    trtllm_scale,
)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("amax", [0.02, 1.0, 448.0, 3.3e4])
def test_table_equals_division_on_every_16_bit_value(dtype, amax):
    """All 65,536 bit patterns (NaN, infinities, subnormals, both zeros) as one weight."""
    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype).reshape(256, 256)
    scale = trtllm_scale(amax)
    table, division = quantize_by_table(every, scale), quantize_by_division(every, scale)
    assert table.dtype == torch.float8_e4m3fn and table.shape == every.shape
    assert torch.equal(table.view(torch.uint8), division.view(torch.uint8))


def test_quantize_trtllm_takes_the_table_for_16_bit_cpu_weights():
    weight = (torch.randn(300, 257) * 0.05).to(torch.bfloat16)
    scale = trtllm_scale(float(weight.abs().max()))
    transposed = weight.t()  # non-contiguous input
    for w in (weight, transposed):
        assert torch.equal(
            quantize_trtllm(w, scale).view(torch.uint8),
            quantize_by_division(w, scale).view(torch.uint8),
        )
    wide = torch.randn(2, 3, dtype=torch.float32)  # fp32 keeps the division
    assert torch.equal(
        quantize_trtllm(wide, scale).view(torch.uint8),
        quantize_by_division(wide, scale).view(torch.uint8),
    )
