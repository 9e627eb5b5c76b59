"""TensorRT-LLM checkpoint `config.json` for DeciLMForCausalLM: writing it.

`trtllm_config` is the one writer (convert uses it with quant_algo null; quantize passes
its FP8 `quantization` dict). Reading a written config back into a `ModelPlan` is
builder.io.trtllm_checkpoint's job, so runtime, deploy and triton never import convert.
Field semantics: trtllm-checkpoint.md §2.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from builder import __version__
from builder.arch.plan import ARCHITECTURE, LayerPlan, ModelPlan
from builder.errors import ConfigError
from builder.io.trtllm_checkpoint import CONFIG_NAME

# Keys TensorRT-LLM's QuantConfig accepts; anything else raises there, so refuse it here.
QUANT_KEYS = {
    "quant_algo",
    "kv_cache_quant_algo",
    "group_size",
    "smoothquant_val",
    "clamp_val",
    "use_meta_recipe",
    "has_zero_point",
    "pre_quant_scale",
    "exclude_modules",
}
NO_QUANTIZATION: Mapping[str, Any] = MappingProxyType(
    {"quant_algo": None, "kv_cache_quant_algo": None}
)


def rotary_scaling(plan: ModelPlan) -> dict[str, Any] | None:
    """HF rope_scaling with both `type` and `rope_type` (older TRT-LLM releases index `type`)."""
    if not plan.rope_scaling:
        return None
    scaling = dict(plan.rope_scaling)
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in (None, "default"):
        return None
    scaling["type"] = scaling["rope_type"] = kind
    return scaling


def layer_config(layer: LayerPlan) -> dict[str, dict[str, Any]]:
    return {
        "attention": {"impl": layer.attention.value, "num_key_value_heads": layer.kv_heads},
        "ffn": {"impl": layer.ffn.value, "intermediate_size": layer.ffn_width},
    }


def trtllm_config(
    plan: ModelPlan,
    tp: int,
    pp: int = 1,
    dtype: str = "bfloat16",
    quantization: Mapping[str, Any] | None = None,
    logits_dtype: str = "float32",
) -> dict[str, Any]:
    """The `config.json` of a TensorRT-LLM DeciLM checkpoint for `plan` split tp x pp."""
    quant = dict(quantization or NO_QUANTIZATION)
    unknown = set(quant) - QUANT_KEYS
    if unknown:
        raise ConfigError(f"quantization keys {sorted(unknown)} are not accepted by TensorRT-LLM")
    quant.setdefault("quant_algo", None)
    quant.setdefault("kv_cache_quant_algo", None)
    attention = plan.attention_layers
    widths = plan.ffn_widths
    return {
        "architecture": ARCHITECTURE,
        "dtype": dtype,
        "logits_dtype": logits_dtype,
        "vocab_size": plan.vocab_size,
        "hidden_size": plan.hidden_size,
        "num_hidden_layers": plan.num_layers,
        "num_attention_heads": plan.num_attention_heads,
        # Global fallbacks only: every layer carries its own value in layer_configs.
        "num_key_value_heads": attention[0].kv_heads if attention else plan.num_attention_heads,
        "intermediate_size": max(widths) if widths else 4 * plan.hidden_size,
        "head_size": plan.head_dim,
        "hidden_act": "silu",  # DeciConfig defaults to gelu
        "norm_epsilon": plan.rms_norm_eps,
        "position_embedding_type": "rope_gpt_neox",
        "max_position_embeddings": plan.max_position_embeddings,
        "rotary_embedding_dim": plan.head_dim,
        "rotary_base": plan.rope_theta,
        "rotary_scaling": rotary_scaling(plan),
        "qk_layernorm": False,
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "mapping": {"world_size": tp * pp, "tp_size": tp, "pp_size": pp},
        "quantization": quant,
        "layer_configs": [layer_config(layer) for layer in plan.layers],
        "layer_types": [layer.attention.value for layer in plan.layers],
        "num_kv_heads_per_layer": [layer.kv_heads for layer in attention],
        "producer": {"name": "builder", "version": __version__},
    }


def write_trtllm_config(directory: Path, config: Mapping[str, Any]) -> Path:
    path = Path(directory) / CONFIG_NAME
    tmp = path.with_suffix(f".json.{os.getpid()}.tmp")  # several runs may share a staging dir
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    tmp.replace(path)
    return path
