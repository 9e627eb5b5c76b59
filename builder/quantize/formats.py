"""The math of the per-linear formats (builder.arch.formats says what they are and how the
checkpoints name them): per-channel scales, the E4M3 casts, and nn.Linear replacements that
emulate each format in fp32 (the block-streamed sensitivity and the hf verify runtime run
them; the executor runs the same per-channel GEMM, builder.runtime.executor)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from builder.arch.formats import (
    MIXED_PRECISION,
    QUANT_CFG,
    LinearFormat,
    Recipe,
    RecipeError,
    Unit,
    block_units,
    linear_bytes,
    model_units,
    read_trtllm_layer_formats,
    recipe_from_hf_quantization,
    unit_key_layer,
    units_of_modules,
)
from builder.convert.layout import RecipeLayout, recipe_layout_for
from builder.dtypes import FP8_MAX
from builder.quantize.fp8 import FP8
from builder.quantize.gptq import Grid, nearest_codes
from builder.runtime.executor import fp8_rowwise_linear, token_scales

__all__ = [
    "AutoOptions",
    "MIXED_PRECISION",
    "QUANT_CFG",
    "LinearFormat",
    "Recipe",
    "RecipeError",
    "RecipeLayout",
    "RowwiseFp8Linear",
    "TensorFp8Linear",
    "Unit",
    "WeightOnlyInt8Linear",
    "block_units",
    "channel_scales",
    "code_dtype",
    "format_scales",
    "grid_of",
    "int8_channel_scales",
    "quantize_int8_channels",
    "weight_codes",
    "fp8_rowwise_linear",
    "linear_bytes",
    "model_units",
    "quantize_channels",
    "quantized_linear",
    "read_trtllm_layer_formats",
    "recipe_from_hf_quantization",
    "token_scales",
    "trtllm_layout_for",
    "unit_key_layer",
    "units_of_modules",
]

trtllm_layout_for = recipe_layout_for


def channel_scales(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel scale, fp32 [out]: row amax / 448 (ModelOpt's axis-0 max
    calibration of the weight quantizer); an all-zero row gets 1.0, as ModelOpt's
    get_scaling_factor_from_weight does, since any scale quantizes it exactly."""
    amax = weight.detach().abs().amax(dim=-1).float()
    scales = amax / FP8_MAX
    return torch.where(scales > 0, scales, torch.ones_like(scales))


def quantize_channels(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """E4M3(W / scale[:, None]), the division in fp32 (row-wise, so any row split is exact)."""
    return (weight.float() / scales.float()[:, None]).to(FP8)


INT8_MAX = 127  # ModelOpt's int8 maxbound: a W8A16 row's scale is its amax / 127


def int8_channel_scales(weight: torch.Tensor) -> torch.Tensor:
    """W8A16's per-output-channel scale, fp32 [out]: row amax / 127 (ModelOpt's axis-0 max
    calibration of an 8-bit integer weight quantizer); an all-zero row gets 1.0."""
    scales = weight.detach().abs().amax(dim=-1).float() / INT8_MAX
    return torch.where(scales > 0, scales, torch.ones_like(scales))


def quantize_int8_channels(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """round(W / scale[:, None]) clamped to [-128, 127], int8 (ModelOpt's int8_wo export;
    round half to even, as torch.round)."""
    return nearest_codes(weight, scales, Grid.INT8)


def weight_codes(fmt: LinearFormat, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`weight`'s nearest codes in `fmt` at `scale` (0-dim, or one per row)."""
    return nearest_codes(weight, scale, grid_of(fmt))


def grid_of(fmt: LinearFormat) -> Grid:
    """The grid GPTQ rounds `fmt`'s weights onto."""
    return Grid.INT8 if fmt is LinearFormat.W8A16 else Grid.E4M3


def code_dtype(fmt: LinearFormat) -> torch.dtype:
    """The dtype of `fmt`'s weight codes in the HF export and the stored rounding."""
    return grid_of(fmt).dtype


def format_scales(fmt: LinearFormat, weight: torch.Tensor) -> torch.Tensor:
    """A per-channel format's row scales of `weight`."""
    return int8_channel_scales(weight) if fmt is LinearFormat.W8A16 else channel_scales(weight)


class WeightOnlyInt8Linear(nn.Module):
    """W8A16: y = x @ (codes * scale[:, None]).T in fp32, activations unquantized."""

    def __init__(self, codes: torch.Tensor, channel_scale: torch.Tensor):
        super().__init__()
        self.register_buffer(
            "dequantized", codes.float() * channel_scale.float().reshape(-1)[:, None]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.dequantized).to(x.dtype)


class RowwiseFp8Linear(nn.Module):
    """An nn.Linear replacement holding an E4M3 weight and its per-channel scales."""

    def __init__(self, weight: torch.Tensor, channel_scale: torch.Tensor):
        super().__init__()
        self.register_buffer("weight_fp32", weight.float())
        self.register_buffer("channel_scale", channel_scale.float().reshape(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_rowwise_linear(x, self.weight_fp32, self.channel_scale).to(x.dtype)


class TensorFp8Linear(nn.Module):
    """y = e4m3(x / input_scale) * input_scale @ (W_e4m3 * weight_scale).T (fake-quant)."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor):
        super().__init__()
        self.register_buffer("dequantized", weight.float() * weight_scale.float())
        self.register_buffer("x_scale", input_scale.float().reshape(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = (x.float() / self.x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float()
        return F.linear(xq * self.x_scale, self.dequantized).to(x.dtype)


def quantized_linear(
    linear: nn.Linear, fmt: LinearFormat, w_amax: float | None, x_amax: float | None
) -> nn.Module:
    """`linear` in `fmt` (per-tensor needs the calibrated weight and input amax)."""
    weight = linear.weight.detach()
    if fmt is LinearFormat.BF16:
        return linear
    if fmt is LinearFormat.FP8_PC_PT:
        scales = channel_scales(weight)
        return RowwiseFp8Linear(quantize_channels(weight, scales), scales)
    if fmt is LinearFormat.W8A16:
        scales = int8_channel_scales(weight)
        return WeightOnlyInt8Linear(quantize_int8_channels(weight, scales), scales)
    if w_amax is None or x_amax is None:
        raise RecipeError("per-tensor FP8 needs calibrated weight and input amax")
    w_scale = torch.tensor(w_amax, dtype=torch.float32) / FP8_MAX
    x_scale = torch.tensor(x_amax, dtype=torch.float32) / FP8_MAX
    return TensorFp8Linear((weight / w_scale.to(weight.dtype)).to(FP8), w_scale, x_scale)


@dataclass(frozen=True)
class AutoOptions:
    """What `builder quantize --recipe auto` was asked for."""

    max_kl: float
    max_bf16_fraction: float = 1.0
    granularity: str = "block"  # or "unit" (each GEMM of a block on its own)
    formats: tuple[LinearFormat, ...] = (LinearFormat.FP8, LinearFormat.FP8_PC_PT)
    windows: int = 8  # calibration windows the sensitivity and the probes are measured on
    tp: int = 4  # the target's parallelism the bytes are counted under
    pp: int = 1
    target: str | None = None
