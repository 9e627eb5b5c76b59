"""TensorRT-LLM checkpoint `config.json` for DeciLMForCausalLM: writing it, and reading it back.

`trtllm_config` is the one writer (convert uses it with quant_algo null; quantize passes
its FP8 `quantization` dict). `plan_from_trtllm_config` turns a written config back into a
`ModelPlan`, so `builder check` and the executor reason about a TensorRT-LLM checkpoint
with the same tensor table as convert. Field semantics: trtllm-checkpoint.md §2.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from builder import __version__
from builder.arch.plan import ARCHITECTURE, AttentionKind, FfnKind, LayerPlan, ModelPlan
from builder.errors import ConfigError

CONFIG_NAME = "config.json"
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


# ---- reading back ------------------------------------------------------------------------------
def _layer_from_config(index: int, entry: Any, config: Mapping[str, Any], where: str) -> LayerPlan:
    try:
        attention = AttentionKind(entry["attention"]["impl"])
        ffn = FfnKind(entry["ffn"]["impl"])
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{where}: layer_configs[{index}] is malformed ({err})") from None
    kv = width = None
    if attention.has_kv_heads:
        kv = entry["attention"].get("num_key_value_heads") or config.get("num_key_value_heads")
        if not isinstance(kv, int) or kv <= 0:
            raise ConfigError(f"{where}: layer_configs[{index}] has no num_key_value_heads")
    if ffn.has_width:
        width = entry["ffn"].get("intermediate_size") or config.get("intermediate_size")
        if not isinstance(width, int) or width <= 0:
            raise ConfigError(f"{where}: layer_configs[{index}] has no intermediate_size")
    return LayerPlan(index, attention, ffn, kv, width)


def plan_from_trtllm_config(config: Mapping[str, Any], source: str = CONFIG_NAME) -> ModelPlan:
    """The ModelPlan a TensorRT-LLM DeciLM config.json describes."""
    if config.get("architecture") != ARCHITECTURE:
        raise ConfigError(
            f"{source}: architecture is {config.get('architecture')!r}, expected {ARCHITECTURE!r}"
        )
    if "block_configs" in config:
        raise ConfigError(
            f"{source}: block_configs (HF form) is not supported here; expected layer_configs"
        )
    try:
        layers = config["layer_configs"]
        num_layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        vocab = int(config["vocab_size"])
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{source}: missing or malformed field {err}") from None
    if not isinstance(layers, list) or len(layers) != num_layers:
        raise ConfigError(
            f"{source}: layer_configs must have num_hidden_layers ({num_layers}) entries"
        )
    scaling = config.get("rotary_scaling")
    return ModelPlan(
        hidden_size=hidden,
        num_attention_heads=heads,
        head_dim=int(config.get("head_size") or hidden // heads),
        vocab_size=vocab,
        layers=tuple(_layer_from_config(i, e, config, source) for i, e in enumerate(layers)),
        rms_norm_eps=float(config.get("norm_epsilon", 1e-5)),
        rope_theta=float(config.get("rotary_base", 10000.0)),
        rope_scaling=MappingProxyType(dict(scaling)) if scaling else None,
        max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
        tie_word_embeddings=False,
        torch_dtype=str(config.get("dtype", "bfloat16")),
        source=source,
        hf_config=MappingProxyType(dict(config)),
    )


def read_trtllm_config(directory: str | Path) -> tuple[dict[str, Any], ModelPlan]:
    """(config dict, plan) of a TensorRT-LLM checkpoint directory."""
    path = Path(directory) / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: missing (is this a TensorRT-LLM checkpoint directory?)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: unreadable ({err})") from None
    return config, plan_from_trtllm_config(config, str(path))


def mapping_of(config: Mapping[str, Any], source: str = CONFIG_NAME) -> tuple[int, int]:
    """(tp, pp) from a config's mapping, checked against world_size."""
    mapping = config.get("mapping") or {}
    tp, pp = int(mapping.get("tp_size", 1)), int(mapping.get("pp_size", 1))
    world = int(mapping.get("world_size", tp * pp))
    if world != tp * pp:
        raise ConfigError(f"{source}: mapping world_size {world} != tp_size {tp} x pp_size {pp}")
    return tp, pp
