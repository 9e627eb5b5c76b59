"""Plain-data summaries of a plan, for `builder info --json` and reports."""

from __future__ import annotations

from typing import Any

from builder.arch.plan import ModelPlan
from builder.arch.tensors import rank_tensors


def layer_rows(plan: ModelPlan) -> list[dict[str, Any]]:
    rows = []
    for layer in plan.layers:
        params = plan.layer_params(layer)
        rows.append(
            {
                "index": layer.index,
                "attention": layer.attention.value,
                "kv_heads": layer.kv_heads,
                "ffn": layer.ffn.value,
                "ffn_width": layer.ffn_width,
                "params": params.total,
                "attention_params": params.attention,
                "ffn_params": params.ffn,
            }
        )
    return rows


def totals(plan: ModelPlan) -> dict[str, Any]:
    return {
        "source": plan.source,
        "hidden_size": plan.hidden_size,
        "num_attention_heads": plan.num_attention_heads,
        "head_dim": plan.head_dim,
        "vocab_size": plan.vocab_size,
        "counts": plan.counts(),
        "ffn_widths": list(plan.ffn_widths),
        "kv_heads": sorted({layer.kv_heads for layer in plan.attention_layers}),
        "params": plan.total_params,
        "linear_params": plan.linear_params,
        "bytes_bf16": plan.total_bytes("bfloat16"),
        "bytes_fp8_linears": plan.fp8_bytes(),
        "kv_cache_bytes_per_token_bf16": plan.kv_bytes_per_token("bfloat16"),
        "kv_cache_bytes_per_token_fp8": plan.kv_bytes_per_token("fp8"),
    }


def rank_summary(plan: ModelPlan, tp: int, pp: int, dtype_bytes: int = 2) -> dict[str, Any]:
    """Per-rank tensor shapes and sizes for a tp x pp layout (raises on an impossible layout)."""
    ranks = []
    for rank in range(tp * pp):
        tensors = rank_tensors(plan, tp, pp, rank)
        ranks.append(
            {
                "rank": rank,
                "tensors": len(tensors),
                "bytes": sum(t.numel for t in tensors) * dtype_bytes,
                "shapes": {t.name: list(t.shape) for t in tensors},
            }
        )
    return {
        "tp": tp,
        "pp": pp,
        "kv_cache_bytes_per_token_per_rank_bf16": plan.kv_bytes_per_token("bfloat16", tp),
        "ranks": ranks,
    }
