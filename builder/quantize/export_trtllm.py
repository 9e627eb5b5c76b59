"""FP8 TensorRT-LLM checkpoint: convert's streaming rank writer plus an FP8 rank transform.

Convert splits each BF16 tensor for its TP rank; `Fp8Transform.apply` then turns a linear's
rank slice into float8_e4m3fn plus fp32 [1] `weights_scaling_factor` / `activation_scaling_factor`
with ModelOpt's TensorRT-LLM export rules (modelopt-fp8.md §6b):
  - scale = amax / 448, from the amax table (never recomputed);
  - qkv: one weight scale, the max over q, k and v, all three quantized to it; fc (gate_proj)
    and gate (up_proj) share the max of their two scales the same way; the activation scale
    of a fused group is the max of its members';
  - weights are divided by the [1]-shaped scale, which is done in fp32, as ModelOpt does;
  - `kv_cache_scaling_factor` = max(k_amax / 448, v_amax / 448, 1.0) on each attention layer;
  - lm_head, the embedding and norms stay in the checkpoint dtype; `exclude_modules: [lm_head]`.
Splitting before quantizing is exact (quantization is elementwise with a global scale), so
every rank stores the same scale values. tests/quantize compare this with ModelOpt's own
`export_tensorrt_llm_checkpoint(decoder_type="llama")` on a Llama-shaped checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from builder.arch.plan import AttentionKind, FfnKind, ModelPlan
from builder.arch.tensors import RankTensor, Split, kv_cache_scale_name, scale_names
from builder.convert import ConvertSummary, Fp8Layout, convert_checkpoint
from builder.convert.progress import ProgressSink
from builder.io.checkpoint import HFCheckpoint
from builder.quantize.amax import AmaxTable
from builder.quantize.formats import (
    PER_CHANNEL_SCALE,
    QUANT_CFG,
    LinearFormat,
    Recipe,
    RecipeLayout,
    channel_scales,
    model_units,
    quantize_channels,
)
from builder.quantize.fp8 import E4M3_MAX, kv_cache_scale, quantize_trtllm, trtllm_scale

FUSED_FFN = ("gate_proj", "up_proj")


def trtllm_quantization(kv_cache: bool) -> dict[str, Any]:
    return {
        "quant_algo": "FP8",
        "kv_cache_quant_algo": "FP8" if kv_cache else None,
        "exclude_modules": ["lm_head"],
    }


def table_digest(table: AmaxTable) -> str:
    return hashlib.sha256(json.dumps(table.to_json(), sort_keys=True).encode()).hexdigest()


class Fp8Transform(Fp8Layout):
    """Convert's FP8 spec layout plus the values: quantized weights and their scales."""

    def __init__(self, table: AmaxTable):
        super().__init__(trtllm_quantization(table.kv_cache))
        self.values: Mapping[str, float] = dict(table.values)
        self.kv_cache = table.kv_cache
        # Part of convert's layout key: a rank written with other scales is never "resumed".
        self.fingerprint = f"fp8-per-tensor:{table_digest(table)}"

    def _table(self) -> AmaxTable:
        return AmaxTable(dict(self.values), kv_cache=self.kv_cache)

    def group(self, item: RankTensor) -> list[str]:
        """HF modules whose scales this rank tensor shares (q/k/v; gate/up; else itself)."""
        modules = [s.removesuffix(".weight") for s in item.rule.source_names(item.layer.index)]
        parent, leaf = modules[0].rsplit(".", 1)
        if leaf in FUSED_FFN:
            return [f"{parent}.{m}" for m in FUSED_FFN]
        return modules

    def scales(self, item: RankTensor) -> tuple[torch.Tensor, torch.Tensor]:
        table = self._table()
        modules = self.group(item)
        w_amax = max(table.weight(m) for m in modules)
        x_amax = max(table.input(m) for m in modules)
        return trtllm_scale(w_amax), trtllm_scale(x_amax)

    def apply(self, item: RankTensor, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if not self.quantized(item):
            out = [(item.name, tensor)]
        else:
            w_scale, x_scale = self.scales(item)
            w_name, x_name = scale_names(item.name)
            out = [
                (item.name, quantize_trtllm(tensor, w_scale)),
                (w_name, w_scale),
                (x_name, x_scale),
            ]
        if self.kv_cache_fp8 and item.rule.split is Split.QKV:
            k_amax, v_amax = self._table().kv(item.layer.index)
            local = int(item.name.split(".")[2])
            out.append((kv_cache_scale_name(local), kv_cache_scale(k_amax, v_amax)))
        return out


def trtllm_effective_table(table: AmaxTable, plan: ModelPlan) -> AmaxTable:
    """The amax each quantizer effectively has in the TensorRT-LLM checkpoint.

    q/k/v and gate/up carry their group's max (weights and inputs), and both KV quantizers
    carry 448 x kv_cache_scaling_factor. Loading this into ModelOpt's fake-quant model gives
    the exact quantization grid the FP8 TensorRT-LLM checkpoint uses.
    """
    values = dict(table.values)
    for layer in plan.layers:
        prefix = f"model.layers.{layer.index}."
        groups = []
        if layer.attention is AttentionKind.ATTENTION:
            groups.append([f"{prefix}self_attn.{p}_proj" for p in "qkv"])
        if layer.ffn is FfnKind.MLP:
            groups.append([f"{prefix}mlp.{m}" for m in FUSED_FFN])
        for group in groups:
            for kind in ("weight_quantizer", "input_quantizer"):
                shared = max(values[f"{m}.{kind}"] for m in group)
                values.update({f"{m}.{kind}": shared for m in group})
        if table.kv_cache and layer.attention is AttentionKind.ATTENTION:
            kv = float(kv_cache_scale(*table.kv(layer.index))) * E4M3_MAX
            values[f"{prefix}self_attn.k_bmm_quantizer"] = values[
                f"{prefix}self_attn.v_bmm_quantizer"
            ] = kv
    return AmaxTable(values, kv_cache=table.kv_cache)


def write_trtllm_fp8(
    src: Path,
    out: Path,
    table: AmaxTable,
    tp: int = 1,
    pp: int = 1,
    dtype: str = "bfloat16",
    workers: int = 1,
    progress: ProgressSink | None = None,
    allow_pickle: bool = False,
) -> ConvertSummary:
    """Write the FP8 TensorRT-LLM checkpoint of `src` into `out` (convert's atomic protocol)."""
    return convert_checkpoint(
        src,
        out,
        tp,
        pp,
        dtype,
        workers=workers,
        transform=Fp8Transform(table),
        quantization=trtllm_quantization(table.kv_cache),
        progress=progress,
        allow_pickle=allow_pickle,
    )


# ---- per-linear formats (builder.quantize.formats) ---------------------------------------------
class RecipeTransform:
    """The rank transform of a recipe: per-tensor FP8 linears as `Fp8Transform` writes them,
    per-channel ones as E4M3 + `per_channel_scale`, BF16 ones unchanged.

    A row-parallel slice (o_proj, down_proj) holds part of every row, so its channel scales
    come from the whole rows in the source checkpoint: every rank stores the same [out]
    vector, as TensorRT-LLM's row-parallel FP8 rowwise linear expects.
    """

    def __init__(
        self, table: AmaxTable, recipe: Recipe, plan: ModelPlan, ckpt: HFCheckpoint, pp: int
    ):
        quantization = recipe.trtllm_quantization(plan, table.kv_cache)
        formats = {}
        if recipe.is_mixed(plan):
            recipe.trtllm_layer_config(plan, table.kv_cache, pp)  # refuses pp > 1
            formats = {
                m.format(j=u.layer): recipe.format_of(u)
                for u in model_units(plan)
                for m in u.trtllm_modules
            }
        default = next(iter(recipe.formats_used(plan)), recipe.default)
        self.layout = RecipeLayout(quantization, default, formats)
        self.fp8 = Fp8Transform(table)
        self.ckpt = ckpt
        self.fingerprint = f"recipe:{table_digest(table)}:{json.dumps(recipe.to_json())}"

    def passthrough(self, item: RankTensor) -> bool:
        return self.layout.passthrough(item)

    def specs(self, item: RankTensor, dtype: torch.dtype) -> list:
        return self.layout.specs(item, dtype)

    def quantized(self, item: RankTensor) -> bool:
        return self.layout.quantized(item)

    def apply(self, item: RankTensor, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        fmt = self.layout.format_of(item)
        if fmt is LinearFormat.FP8:
            return self.fp8.apply(item, tensor)
        if fmt is LinearFormat.FP8_PC_PT:
            module = item.name.removesuffix(".weight")
            scales = self.channel_scales(item, tensor)
            out = [
                (item.name, quantize_channels(tensor, scales)),
                (f"{module}.{PER_CHANNEL_SCALE}", scales),
            ]
        else:
            out = [(item.name, tensor)]
        if self.layout.kv_cache_fp8 and item.rule.split is Split.QKV:
            k_amax, v_amax = self.fp8._table().kv(item.layer.index)
            local = int(item.name.split(".")[2])
            out.append((kv_cache_scale_name(local), kv_cache_scale(k_amax, v_amax)))
        return out

    def channel_scales(self, item: RankTensor, tensor: torch.Tensor) -> torch.Tensor:
        if item.rule.split is not Split.ROW:
            return channel_scales(tensor)
        (source,) = item.rule.source_names(item.layer.index)
        info = self.ckpt.info(source)
        step = max(1, (64 << 20) // (4 * info.shape[1]))
        blocks = [
            channel_scales(self.ckpt.read(source, rows=slice(r, min(r + step, info.shape[0]))))
            for r in range(0, info.shape[0], step)
        ]
        return torch.cat(blocks)


def write_trtllm_recipe(
    src: Path,
    out: Path,
    table: AmaxTable,
    recipe: Recipe,
    plan: ModelPlan,
    ckpt: HFCheckpoint,
    tp: int = 1,
    pp: int = 1,
    dtype: str = "bfloat16",
    workers: int = 1,
    allow_pickle: bool = False,
) -> ConvertSummary:
    """The TensorRT-LLM checkpoint of `recipe`; a mixed recipe also gets quant_cfg.json."""
    if recipe.formats_used(plan) == {LinearFormat.FP8}:
        return write_trtllm_fp8(src, out, table, tp, pp, dtype, workers, allow_pickle=allow_pickle)
    transform = RecipeTransform(table, recipe, plan, ckpt, pp)
    summary = convert_checkpoint(
        src,
        out,
        tp,
        pp,
        dtype,
        workers=workers,
        transform=transform,
        quantization=transform.layout.quantization,
        allow_pickle=allow_pickle,
    )
    layer_config = recipe.trtllm_layer_config(plan, table.kv_cache, pp)
    if layer_config is not None:
        from builder.io.manifest import file_entry, read_manifest, write_manifest

        path = out / QUANT_CFG
        path.write_text(json.dumps(layer_config, indent=2) + "\n")
        manifest = read_manifest(out)
        manifest.setdefault("files", {})[QUANT_CFG] = file_entry(path)
        write_manifest(out, manifest)
    return summary
