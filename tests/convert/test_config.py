"""config.json of the TensorRT-LLM checkpoint, field by field (trtllm-checkpoint.md §2)."""

from __future__ import annotations

import pytest

from builder.arch import AttentionKind, FfnKind, preset_plan
from builder.convert.trtllm_config import trtllm_config
from builder.errors import ConfigError
from builder.io.trtllm_checkpoint import plan_from_trtllm_config


def test_ultra_config_has_every_field_trtllm_needs():
    config = trtllm_config(preset_plan("ultra-253b"), tp=8)
    expected = {
        "architecture": "DeciLMForCausalLM",
        "dtype": "bfloat16",
        "logits_dtype": "float32",
        "vocab_size": 128256,
        "hidden_size": 16384,
        "num_hidden_layers": 162,
        "num_attention_heads": 128,
        "head_size": 128,
        "hidden_act": "silu",
        "norm_epsilon": 1e-5,
        "position_embedding_type": "rope_gpt_neox",
        "max_position_embeddings": 131072,
        "rotary_embedding_dim": 128,
        "rotary_base": 500000.0,
        "qk_layernorm": False,
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "mapping": {"world_size": 8, "tp_size": 8, "pp_size": 1},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }
    assert {k: config[k] for k in expected} == expected
    assert config["rotary_scaling"] == {
        "type": "llama3",
        "rope_type": "llama3",
        "factor": 16.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert len(config["layer_configs"]) == 162
    assert config["layer_configs"][134] == {
        "attention": {"impl": "no_op", "num_key_value_heads": None},
        "ffn": {"impl": "mlp", "intermediate_size": 425984},
    }
    assert config["layer_configs"][0] == {
        "attention": {"impl": "attention", "num_key_value_heads": 8},
        "ffn": {"impl": "mlp", "intermediate_size": 5376},
    }
    assert config["layer_configs"][9]["ffn"] == {"impl": "no_op", "intermediate_size": None}
    assert config["num_kv_heads_per_layer"] == [8] * 64  # attention layers only
    assert (
        config["layer_types"].count("attention") == 64
        and config["layer_types"].count("no_op") == 98
    )
    assert "block_configs" not in config  # giving both is an error in DeciConfig


def test_linear_replacements_and_pipeline_mapping():
    config = trtllm_config(preset_plan("mixed"), tp=2, pp=3, dtype="float32")
    assert config["mapping"] == {"world_size": 6, "tp_size": 2, "pp_size": 3}
    assert config["dtype"] == "float32"
    impls = [(c["attention"]["impl"], c["ffn"]["impl"]) for c in config["layer_configs"]]
    assert (
        ("linear", "mlp") in impls
        and ("attention", "linear") in impls
        and ("linear", "linear") in impls
    )
    assert config["layer_types"][2] == "linear"


def test_quantization_dict_is_passed_through_and_checked():
    quant = {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]}
    assert trtllm_config(preset_plan("mixed"), 1, quantization=quant)["quantization"] == quant
    with pytest.raises(ConfigError, match="not accepted by TensorRT-LLM"):
        trtllm_config(
            preset_plan("mixed"), 1, quantization={"quant_algo": "FP8", "calib_size": 512}
        )


def test_model_without_rope_scaling_writes_null():
    plan = preset_plan("mixed")
    config = dict(plan.hf_config, rope_scaling=None)
    from builder.arch import parse_config

    assert trtllm_config(parse_config(config), 1)["rotary_scaling"] is None


@pytest.mark.parametrize("preset", ["ultra-253b", "super-49b", "mixed"])
def test_config_reads_back_to_the_same_layers(preset):
    plan = preset_plan(preset)
    back = plan_from_trtllm_config(trtllm_config(plan, tp=1))
    assert back.layers == plan.layers
    assert (back.hidden_size, back.num_attention_heads, back.head_dim, back.vocab_size) == (
        plan.hidden_size,
        plan.num_attention_heads,
        plan.head_dim,
        plan.vocab_size,
    )
    assert back.rope_theta == plan.rope_theta and back.rms_norm_eps == plan.rms_norm_eps
    assert {layer.attention for layer in back.layers} <= set(AttentionKind)
    assert {layer.ffn for layer in back.layers} <= set(FfnKind)


def test_reading_refuses_a_foreign_config():
    config = trtllm_config(preset_plan("mixed"), 1)
    with pytest.raises(ConfigError, match="architecture is 'LlamaForCausalLM'"):
        plan_from_trtllm_config(dict(config, architecture="LlamaForCausalLM"))
    with pytest.raises(ConfigError, match="layer_configs must have num_hidden_layers"):
        plan_from_trtllm_config(dict(config, layer_configs=config["layer_configs"][:3]))
