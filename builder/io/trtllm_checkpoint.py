"""Reading a TensorRT-LLM checkpoint directory: its `config.json` back into a `ModelPlan`, its
mapping, the names of its rank files.

The writer is builder.convert (trtllm_config, rank_writer); readers (runtime's executor,
`builder check`, deploy's inputs, bench) need only this module, so they sit below convert.
Field semantics: trtllm-checkpoint.md §2.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from builder.arch.plan import ARCHITECTURE, AttentionKind, FfnKind, LayerPlan, ModelPlan
from builder.errors import ConfigError

CONFIG_NAME = "config.json"


def rank_file_name(rank: int) -> str:
    return f"rank{rank}.safetensors"


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
