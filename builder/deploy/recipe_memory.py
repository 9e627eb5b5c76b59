"""What a per-linear recipe's weights cost: bytes per linear and per rank file, the share left
in BF16, and `builder plan --recipe` (each target's weights per rank under a recipe). Torch-free,
as `builder plan` is."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from builder.arch.formats import LinearFormat, Recipe, Unit, linear_bytes, model_units
from builder.arch.plan import ModelPlan
from builder.arch.tensors import WEIGHT, Split, layer_hf_shapes, linear_module, rank_tensors
from builder.units import GIB

BYTES_PER_BF16 = 2


# ---- bytes ----------------------------------------------------------------------------------
def unit_shapes(plan: ModelPlan, unit: Unit) -> list[tuple[int, int]]:
    layer = plan.layers[unit.layer]
    shapes = layer_hf_shapes(plan, layer)
    return [tuple(shapes[f"{m}.{WEIGHT}"]) for m in unit.hf_modules]


def unit_bytes(plan: ModelPlan, unit: Unit, fmt: LinearFormat, tp: int = 1) -> float:
    """Bytes of the unit's weights on one TP rank (column and row splits divide by tp)."""
    return sum(linear_bytes(s, fmt) for s in unit_shapes(plan, unit)) / tp


def decoder_linear_params(plan: ModelPlan) -> int:
    return sum(math.prod(s) for u in model_units(plan) for s in unit_shapes(plan, u))


def bf16_fraction(plan: ModelPlan, recipe: Recipe) -> float:
    """Share of the decoder linears' parameters a recipe leaves in BF16."""
    bf16 = sum(
        math.prod(s)
        for u in model_units(plan)
        if recipe.format_of(u) is LinearFormat.BF16
        for s in unit_shapes(plan, u)
    )
    return bf16 / decoder_linear_params(plan)


def rank_bytes(
    plan: ModelPlan, recipe: Recipe, tp: int, pp: int, kv_fp8: bool = False
) -> list[int]:
    """Weight bytes of each rank file under `recipe` (embedding, norms and lm_head in BF16).

    A model the layout cannot split (SmolLM2's 9 heads on tp 4) gets the ideal split: the
    tp=1 bytes divided evenly, so small models can still be compared at a target's width.
    """
    from builder.errors import ParallelismError

    try:
        return _rank_bytes(plan, recipe, tp, pp, kv_fp8)
    except ParallelismError:
        whole = _rank_bytes(plan, recipe, 1, 1, kv_fp8)[0]
        return [whole // (tp * pp)] * (tp * pp)


def _rank_bytes(plan: ModelPlan, recipe: Recipe, tp: int, pp: int, kv_fp8: bool) -> list[int]:
    formats = recipe.by_hf_module(plan)
    out = []
    for rank in range(tp * pp):
        total = 0
        for tensor in rank_tensors(plan, tp, pp, rank):
            numel = math.prod(tensor.shape)
            sources = [
                linear_module(s)
                for s in tensor.rule.source_names(
                    tensor.layer.index if tensor.layer is not None else None
                )
            ]
            fmt = formats.get(sources[0], LinearFormat.BF16) if tensor.rule.linear else None
            if fmt is None or fmt is LinearFormat.BF16:
                total += numel * BYTES_PER_BF16
            elif fmt.per_channel:
                total += numel + 4 * tensor.shape[0]
            else:
                total += numel + 8
            if kv_fp8 and tensor.rule.split is Split.QKV:
                total += 4  # kv_cache_scaling_factor, fp32 [1]
        out.append(total)
    return out


# ---- builder plan --recipe ----------------------------------------------------------------
def load_recipe_source(path: Path) -> Recipe:
    """A recipe JSON file, or the recipe a `builder quantize` OUT (or its manifest) records."""
    from builder.errors import UserError

    path = Path(path)
    manifest = path / "manifest.json" if path.is_dir() else path
    try:
        data = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{manifest}: unreadable recipe ({err})") from None
    if "quantization" in data:
        data = (data["quantization"] or {}).get("recipe") or {"default": "fp8"}
    return Recipe.from_json(data.get("recipe", data), str(manifest))


def recipe_memory(target_plan: Any, recipe: Recipe) -> dict[str, Any]:
    """What the recipe's weights cost per rank on the planned target, next to the plan's own
    precision (the rest of the plan, activations and reserve, does not depend on it)."""
    plan, profile = target_plan.model, target_plan.profile
    recipe.validate(plan)
    tp, pp = profile.parallel.tp, profile.parallel.pp
    weights = rank_bytes(plan, recipe, tp, pp, profile.precision.kv_cache == "fp8")
    planned = [r.weights for r in target_plan.ranks] or weights
    free = [r.free + p - w for r, p, w in zip(target_plan.ranks, planned, weights, strict=False)]
    return {
        "recipe": recipe.to_json(),
        "bf16_fraction": bf16_fraction(plan, recipe),
        "weights_per_rank": weights,
        "planned_weights_per_rank": planned,
        "free_per_rank": free,
    }


def format_recipe_memory(name: str, memory: dict[str, Any]) -> str:
    w, p = max(memory["weights_per_rank"]), max(memory["planned_weights_per_rank"])
    free = min(memory["free_per_rank"]) if memory["free_per_rank"] else None
    line = (
        f"{name}: recipe ({memory['bf16_fraction']:.1%} of decoder linears BF16) weights "
        f"{w / GIB:,.2f} GiB per rank (plan's precision: {p / GIB:,.2f} GiB)"
    )
    if free is not None:
        line += f"; free after weights, activations and reserve {free / GIB:,.2f} GiB"
    return line
