"""What each rank file holds: tensor specs per rank, and the hook that changes them.

Plain conversion writes each rank tensor of `rank_tensors` once, in the output dtype. A
`RankTransform` (FP8 quantization) turns one produced rank tensor into several output
tensors; it declares their specs up front (`specs`), so the safetensors header can still be
written before any weight is read, and produces them later (`apply`). `Fp8Layout` implements
the spec half of TensorRT-LLM's per-tensor FP8 layout (trtllm-checkpoint.md §5): `builder
check` uses it to know what an FP8 checkpoint must contain, `builder quantize` subclasses it
and adds `apply`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from builder.arch.formats import LinearFormat, trtllm_formats
from builder.arch.plan import ModelPlan
from builder.arch.tensors import (
    TRTLLM_DEFAULT_FP8_EXCLUDES,
    RankTensor,
    Split,
    kv_cache_scale_name,
    linear_module,
    per_channel_scale_name,
    rank_tensors,
    scale_names,
)
from builder.dtypes import BF16, F8_E4M3, F16, F32, Dtype
from builder.errors import ConfigError, UserError
from builder.io.safetensors_stream import TensorSpec

# TensorRT-LLM's default exclude list, used when a quantization dict gives none.
DEFAULT_FP8_EXCLUDES = TRTLLM_DEFAULT_FP8_EXCLUDES

DTYPES = {d.name: d for d in (BF16, F16, F32)}


def output_dtype(name: str) -> Dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise UserError(
            f"unsupported output dtype {name!r}; choose one of {', '.join(DTYPES)}"
        ) from None


@runtime_checkable
class RankTransform(Protocol):
    """Turns one produced rank tensor into the tensor(s) written for it.

    `specs(item, dtype)`: names, shapes and dtypes of what `apply` will return for `item`
    (called before any weight is read; must not read weights). `apply(item, tensor)`: given
    the rank tensor in the output dtype (whole, shape `item.shape`), return `[(name,
    tensor), ...]` matching `specs` exactly and in the same order. Instances must be
    picklable when convert runs with workers > 1.

    Optional `passthrough(item) -> bool`: True when `item` is written unchanged; it is then
    streamed in blocks like a plain conversion (never assembled whole, `apply` not called).
    Optional `blockwise(item, dtype) -> (convert, extras) | None`: for an elementwise change,
    `convert(raw)` maps the raw bytes of any row block of the rank tensor (in the output
    dtype) to the bytes of the same rows of its first output, and `extras` are the
    remaining `(name, tensor)` outputs; the tensor is then streamed, never assembled, and
    must give the same bytes as `apply` would.
    """

    def specs(self, item: RankTensor, dtype: Dtype) -> list[TensorSpec]: ...

    def apply(self, item: RankTensor, tensor: Any) -> list[tuple[str, Any]]: ...


def plain_specs(item: RankTensor, dtype: Dtype) -> list[TensorSpec]:
    return [TensorSpec(item.name, item.shape, dtype)]


@dataclass(frozen=True)
class RankLayout:
    """Everything written to one rank file, grouped by the rank tensor that produces it."""

    rank: int
    items: tuple[RankTensor, ...]
    specs: tuple[tuple[TensorSpec, ...], ...]  # specs[i]: outputs of items[i]

    @property
    def flat_specs(self) -> list[TensorSpec]:
        return [spec for group in self.specs for spec in group]

    @property
    def data_bytes(self) -> int:
        return sum(spec.nbytes for spec in self.flat_specs)


def rank_layout(
    plan: ModelPlan,
    tp: int,
    pp: int,
    rank: int,
    dtype: Dtype,
    transform: RankTransform | None = None,
) -> RankLayout:
    items = tuple(rank_tensors(plan, tp, pp, rank))
    spec_of = transform.specs if transform is not None else plain_specs
    return RankLayout(rank, items, tuple(tuple(spec_of(item, dtype)) for item in items))


# ---- FP8 layout (specs only) --------------------------------------------------------------------
class Fp8Layout:
    """Spec side of TensorRT-LLM per-tensor FP8: each non-excluded linear weight becomes
    float8_e4m3fn plus float32 [1] `weights_scaling_factor` and `activation_scaling_factor`;
    with an FP8 KV cache, each attention layer's qkv also brings `kv_cache_scaling_factor`.
    Subclass and implement `apply` to produce the values.
    """

    def __init__(self, quantization: Mapping[str, Any]):
        self.quantization = dict(quantization)
        self.excludes = tuple(self.quantization.get("exclude_modules") or DEFAULT_FP8_EXCLUDES)
        self.kv_cache_fp8 = self.quantization.get("kv_cache_quant_algo") == "FP8"

    def quantized(self, item: RankTensor) -> bool:
        module = linear_module(item.name)
        return item.rule.linear and not any(fnmatch.fnmatchcase(module, p) for p in self.excludes)

    def passthrough(self, item: RankTensor) -> bool:
        """Excluded linears, norms, embedding: written as they are (streamed, not assembled)."""
        return not self.quantized(item) and not (self.kv_cache_fp8 and item.rule.split is Split.QKV)

    def specs(self, item: RankTensor, dtype: Dtype) -> list[TensorSpec]:
        if not self.quantized(item):
            out = [TensorSpec(item.name, item.shape, dtype)]
        else:
            w_scale, a_scale = scale_names(item.name)
            out = [
                TensorSpec(item.name, item.shape, F8_E4M3),
                TensorSpec(w_scale, (1,), F32),
                TensorSpec(a_scale, (1,), F32),
            ]
        if self.kv_cache_fp8 and item.rule.split is Split.QKV:
            out.append(TensorSpec(kv_cache_scale_name(item.local), (1,), F32))
        return out

    def apply(self, item: RankTensor, tensor: Any) -> list[tuple[str, Any]]:
        raise NotImplementedError("Fp8Layout only declares specs; subclass it to quantize")


def layout_for(quantization: Mapping[str, Any] | None) -> Fp8Layout | None:
    """The spec transform a config's `quantization` implies (None: plain conversion)."""
    algo = (quantization or {}).get("quant_algo")
    kv = (quantization or {}).get("kv_cache_quant_algo")
    if algo in (None, "FP8") and kv in (None, "FP8"):
        return Fp8Layout(quantization) if (algo or kv) else None
    raise ConfigError(f"quantization {dict(quantization)} is not supported (only FP8 per-tensor)")


class RecipeLayout(Fp8Layout):
    """Spec side of a TensorRT-LLM checkpoint whose linears each have a format
    (builder.arch.formats).

    `formats` maps TensorRT-LLM module names (as in the rank files) to their format; a module
    not in it takes `default`. Per-tensor FP8 modules get Fp8Layout's specs; per-channel ones
    an E4M3 weight plus an fp32 per-channel scale [out of this rank]; BF16 and W8A16 ones stay
    in the checkpoint dtype. The KV-cache scale follows the KV cache, not qkv's format.
    """

    def __init__(
        self,
        quantization: Mapping[str, Any],
        default: LinearFormat,
        formats: Mapping[str, LinearFormat] | None = None,
    ):
        super().__init__(quantization)
        self.default = default
        self.formats = dict(formats or {})

    def format_of(self, item: RankTensor) -> LinearFormat:
        if not super().quantized(item):
            return LinearFormat.BF16
        return self.formats.get(linear_module(item.name), self.default)

    def quantized(self, item: RankTensor) -> bool:
        """Whether the checkpoint stores the item as codes: a W8A16 weight stays in the
        checkpoint dtype (the build quantizes it, builder.arch.formats)."""
        return self.format_of(item).fp8

    def specs(self, item: RankTensor, dtype: Dtype) -> list[TensorSpec]:
        fmt = self.format_of(item)
        if fmt is LinearFormat.FP8:
            return super().specs(item, dtype)
        if fmt is LinearFormat.FP8_PC_PT:
            out = [
                TensorSpec(item.name, item.shape, F8_E4M3),
                TensorSpec(per_channel_scale_name(item.name), (item.shape[0],), F32),
            ]
        else:
            out = [TensorSpec(item.name, item.shape, dtype)]
        if self.kv_cache_fp8 and item.rule.split is Split.QKV:
            out.append(TensorSpec(kv_cache_scale_name(item.local), (1,), F32))
        return out


def recipe_layout_for(directory: Path, config: Mapping[str, Any]) -> RecipeLayout | None:
    """The RecipeLayout a TensorRT-LLM config implies when it is per-channel or mixed (None for
    plain or per-tensor checkpoints, which `layout_for` covers)."""
    found = trtllm_formats(directory, config)
    if found is None:
        return None
    default, formats = found
    return RecipeLayout(config.get("quantization") or {}, default, formats)
