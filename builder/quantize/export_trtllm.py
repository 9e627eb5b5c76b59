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

from builder.arch.plan import ModelPlan
from builder.arch.tensors import (
    INPUT_QUANTIZER,
    ROLES,
    WEIGHT_QUANTIZER,
    RankTensor,
    Split,
    block_roles,
    cache_roles,
    group_roles,
    hf_module,
    kv_cache_scale_name,
    kv_quantizer,
    linear_module,
    per_channel_scale_name,
    scale_names,
    trtllm_fp8_excludes,
)
from builder.convert import ConvertRequest, ConvertSummary, Fp8Layout, convert
from builder.convert.progress import ProgressSink
from builder.dtypes import BF16, F16, FP8_MAX, Dtype
from builder.io.checkpoint import HFCheckpoint
from builder.quantize.amax import AmaxTable
from builder.quantize.formats import (
    QUANT_CFG,
    LinearFormat,
    Recipe,
    RecipeLayout,
    channel_scales,
    quantize_channels,
)
from builder.quantize.fp8 import (
    TableQuantizer,
    e4m3_table,
    kv_cache_scale,
    quantize_trtllm,
    trtllm_scale,
)
from builder.quantize.rounding import RoundingStore


def trtllm_quantization(kv_cache: bool) -> dict[str, Any]:
    return {
        "quant_algo": "FP8",
        "kv_cache_quant_algo": "FP8" if kv_cache else None,
        "exclude_modules": trtllm_fp8_excludes(),
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
        """HF modules whose scales this rank tensor shares (its scale group; else itself)."""
        group = ROLES[item.rule.role].scale_group
        roles = group_roles(group) if group else item.rule.roles
        return [hf_module(role, item.layer.index) for role in roles]

    def scales(self, item: RankTensor) -> tuple[torch.Tensor, torch.Tensor]:
        table = self._table()
        modules = self.group(item)
        w_amax = max(table.weight(m) for m in modules)
        x_amax = max(table.input(m) for m in modules)
        return trtllm_scale(w_amax), trtllm_scale(x_amax)

    def apply(self, item: RankTensor, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if not self.quantized(item):
            return [(item.name, tensor), *self._kv_scale(item)]
        w_scale, x_scale = self.scales(item)
        return [
            (item.name, quantize_trtllm(tensor, w_scale)),
            *self._scales(item, w_scale, x_scale),
        ]

    def blockwise(self, item: RankTensor, dtype: Dtype):
        """A quantized 16-bit linear streams through a table lookup, block by block (the
        bits of `apply`, which uses the same table on the whole tensor), so the export runs
        at copy speed and holds no whole tensor; the scales follow the weight."""
        if not self.quantized(item) or dtype not in (BF16, F16):
            return None
        w_scale, x_scale = self.scales(item)
        return TableQuantizer(e4m3_table(dtype.torch, w_scale)), self._scales(
            item, w_scale, x_scale
        )

    def _scales(self, item: RankTensor, w_scale, x_scale) -> list[tuple[str, torch.Tensor]]:
        w_name, x_name = scale_names(item.name)
        return [(w_name, w_scale), (x_name, x_scale), *self._kv_scale(item)]

    def _kv_scale(self, item: RankTensor) -> list[tuple[str, torch.Tensor]]:
        if not (self.kv_cache_fp8 and item.rule.split is Split.QKV):
            return []
        k_amax, v_amax = self._table().kv(item.layer.index)
        return [(kv_cache_scale_name(item.local), kv_cache_scale(k_amax, v_amax))]


def trtllm_effective_table(table: AmaxTable, plan: ModelPlan) -> AmaxTable:
    """The amax each quantizer effectively has in the TensorRT-LLM checkpoint.

    q/k/v and gate/up carry their group's max (weights and inputs), and both KV quantizers
    carry 448 x kv_cache_scaling_factor. Loading this into ModelOpt's fake-quant model gives
    the exact quantization grid the FP8 TensorRT-LLM checkpoint uses.
    """
    values = dict(table.values)
    for layer in plan.layers:
        present = dict.fromkeys(ROLES[role].scale_group for role in block_roles(layer))
        for group in filter(None, present):
            modules = [hf_module(role, layer.index) for role in group_roles(group)]
            for kind in (WEIGHT_QUANTIZER, INPUT_QUANTIZER):
                shared = max(values[f"{m}.{kind}"] for m in modules)
                values.update({f"{m}.{kind}": shared for m in modules})
        if table.kv_cache and layer.has_kv_cache:
            kv = float(kv_cache_scale(*table.kv(layer.index))) * FP8_MAX
            for role in cache_roles():
                values[kv_quantizer(ROLES[role].cache, layer.index)] = kv
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
    request = ConvertRequest(
        src,
        out,
        tp,
        pp,
        dtype,
        workers=workers,
        transform=Fp8Transform(table),
        quantization=trtllm_quantization(table.kv_cache),
        allow_pickle=allow_pickle,
    )
    return convert(request, progress=progress)


# ---- per-linear formats (builder.quantize.formats) ---------------------------------------------
class RecipeTransform:
    """The rank transform of a recipe: per-tensor FP8 linears as `Fp8Transform` writes them,
    per-channel ones as E4M3 + `per_channel_scale`, BF16 and W8A16 ones unchanged (the build
    quantizes W8A16 weights, builder.arch.formats).

    A row-parallel slice (o_proj, down_proj) holds part of every row, so its channel scales
    come from the whole rows in the source checkpoint: every rank stores the same [out]
    vector, as TensorRT-LLM's row-parallel FP8 rowwise linear expects.

    With `rounding` (GPTQ), quantized linears are not rounded here: each rank's slice is cut
    from the stored codes (builder.quantize.rounding) with convert's own read plan, so the
    TensorRT-LLM and HF checkpoints hold the same codes byte for byte.
    """

    def __init__(
        self,
        table: AmaxTable,
        recipe: Recipe,
        plan: ModelPlan,
        ckpt: HFCheckpoint,
        pp: int,
        tp: int = 1,
        rounding: RoundingStore | None = None,
    ):
        recipe.check_trtllm(plan)
        quantization = recipe.trtllm_quantization(plan, table.kv_cache)
        formats = {}
        if recipe.is_mixed(plan):
            recipe.trtllm_layer_config(plan, table.kv_cache, pp)  # refuses pp > 1
            formats = recipe.by_trtllm_module(plan)
        default = next(iter(recipe.formats_used(plan)), recipe.default)
        self.layout = RecipeLayout(quantization, default, formats)
        self.fp8 = Fp8Transform(table)
        self.ckpt = ckpt
        self.tp, self.rounding = tp, rounding
        self._plan: ModelPlan | None = plan  # not pickled to convert's workers (see plan)
        self._row_scales: dict[str, torch.Tensor] = {}
        self.fingerprint = f"recipe:{table_digest(table)}:{json.dumps(recipe.to_json())}"
        if rounding is not None:
            self.fingerprint += f":rounding:{rounding.digest()}"

    def passthrough(self, item: RankTensor) -> bool:
        return self.layout.passthrough(item)

    def specs(self, item: RankTensor, dtype: torch.dtype) -> list:
        return self.layout.specs(item, dtype)

    def quantized(self, item: RankTensor) -> bool:
        return self.layout.quantized(item)

    def apply(self, item: RankTensor, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        fmt = self.layout.format_of(item)
        if self.rounding is not None and self.quantized(item):
            return self.stored(item, tensor, fmt)
        if fmt is LinearFormat.FP8:
            return self.fp8.apply(item, tensor)
        if fmt is LinearFormat.FP8_PC_PT:
            scales = self.channel_scales(item, tensor)
            out = [
                (item.name, quantize_channels(tensor, scales)),
                (per_channel_scale_name(item.name), scales),
            ]
        else:
            out = [(item.name, tensor)]
        return out + self.fp8._kv_scale(item)

    @property
    def plan(self) -> ModelPlan:
        """The model plan (a worker process reloads it from the source's config.json)."""
        if self._plan is None:
            from builder.arch.plan import load_plan

            self._plan = load_plan(self.ckpt.root)
        return self._plan

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_plan": None}

    def stored(
        self, item: RankTensor, tensor: torch.Tensor, fmt: LinearFormat
    ) -> list[tuple[str, torch.Tensor]]:
        """The rank slice of the stored codes, and the scales they were made with."""
        pieces = self.rank_pieces(item)
        rounding = self.rounding
        codes = torch.cat(
            [
                rounding.codes(linear_module(p.source), fmt, p.rows)[
                    :, p.cols or slice(None)
                ].contiguous()
                for p in pieces
            ]
        )
        if tuple(codes.shape) != tuple(tensor.shape):
            raise AssertionError(f"{item.name}: stored codes {codes.shape}, rank {tensor.shape}")
        if fmt is LinearFormat.FP8:
            # one scale for the fused group, as Fp8Transform writes it (rounding.unit_scale)
            w_scale = rounding.scale(linear_module(pieces[0].source), fmt).float().reshape(1)
            x_scale = self.fp8.scales(item)[1]
            return [(item.name, codes), *self.fp8._scales(item, w_scale, x_scale)]
        scales = torch.cat([rounding.scale(linear_module(p.source), fmt)[p.rows] for p in pieces])
        return [
            (item.name, codes),
            (per_channel_scale_name(item.name), scales.float()),
            *self.fp8._kv_scale(item),
        ]

    def rank_pieces(self, item: RankTensor) -> tuple:
        """Convert's read plan of the item's TP slice: where its stored codes are cut from."""
        from builder.convert.sources import read_plan

        return read_plan(self.plan, item, self.tp, item.tp_rank).pieces

    def blockwise(self, item: RankTensor, dtype: Dtype):
        """Per-tensor FP8 linears stream through Fp8Transform's e4m3 table; a per-channel
        linear needs its rows' amax first and a BF16 one is unchanged, so neither does (a
        BF16 linear without a KV-cache scale is a passthrough, streamed by convert). Stored
        (GPTQ) codes are cut by `apply`."""
        if self.rounding is not None:
            return None
        if self.layout.format_of(item) is not LinearFormat.FP8:
            return None
        return self.fp8.blockwise(item, dtype)

    def channel_scales(self, item: RankTensor, tensor: torch.Tensor) -> torch.Tensor:
        if item.rule.split is not Split.ROW:
            return channel_scales(tensor)
        (source,) = item.rule.source_names(item.layer.index)
        if source not in self._row_scales:  # every rank's slice needs the same whole rows
            info = self.ckpt.info(source)
            step = max(1, (64 << 20) // (4 * info.shape[1]))
            blocks = [
                channel_scales(self.ckpt.read(source, rows=slice(r, min(r + step, info.shape[0]))))
                for r in range(0, info.shape[0], step)
            ]
            self._row_scales[source] = torch.cat(blocks)
        return self._row_scales[source]


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
    progress: ProgressSink | None = None,
    allow_pickle: bool = False,
    rounding: RoundingStore | None = None,
) -> ConvertSummary:
    """The TensorRT-LLM checkpoint of `recipe`; a mixed recipe also gets quant_cfg.json.
    `rounding`: stored (GPTQ) codes, written instead of rounding the source to nearest."""
    if recipe.formats_used(plan) == {LinearFormat.FP8} and rounding is None:
        return write_trtllm_fp8(
            src, out, table, tp, pp, dtype, workers, progress, allow_pickle=allow_pickle
        )
    transform = RecipeTransform(table, recipe, plan, ckpt, pp, tp, rounding)
    request = ConvertRequest(
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
    summary = convert(request, progress=progress)
    layer_config = recipe.trtllm_layer_config(plan, table.kv_cache, pp)
    if layer_config is not None:
        from builder.io.manifest import file_entry, read_manifest, write_manifest

        path = out / QUANT_CFG
        path.write_text(json.dumps(layer_config, indent=2) + "\n")
        manifest = read_manifest(out)
        manifest.setdefault("files", {})[QUANT_CFG] = file_entry(path)
        write_manifest(out, manifest)
    return summary
