"""The block_configs parser: preset facts, the FFN-width rule, and refusals."""

from __future__ import annotations

import copy

import pytest

from builder.arch import (
    AttentionKind,
    FfnKind,
    intermediate_size,
    parse_config,
    preset_config,
    preset_plan,
)
from builder.errors import ConfigError

ULTRA_ATTENTION_LAYERS = (
    list(range(9))
    + list(range(13, 18))
    + [24, 25, 26, 32, 33, 34, 35, 39, 40, 41, 43]
    + [50, 51, 52, 53, 59, 60, 61, 62, 68, 69, 70, 71, 77, 78, 79, 80, 86, 87, 88, 89]
    + [92, 93, 94, 95, 98, 107, 113, 114, 116, 151, 152]
    + list(range(154, 162))
)


def test_ultra_facts():
    plan = preset_plan("ultra-253b")
    assert round(plan.total_params / 1e9, 2) == 253.40
    assert plan.num_layers == 162
    assert [layer.index for layer in plan.attention_layers] == ULTRA_ATTENTION_LAYERS
    assert len(plan.attention_layers) == 64
    assert {layer.kv_heads for layer in plan.attention_layers} == {8}
    assert len(plan.empty_layers) == 81
    assert min(plan.ffn_widths) == 5376 and max(plan.ffn_widths) == 425984
    assert plan.ffn_widths == (
        5376,
        10752,
        16128,
        21504,
        26624,
        32000,
        37376,
        53248,
        301056,
        343040,
        399360,
        425984,
    )
    assert plan.kv_bytes_per_token("bfloat16") == 262_144
    assert plan.kv_bytes_per_token("fp8") == 131_072
    assert plan.kv_bytes_per_token("bfloat16", tp=8) == 32 * 1024
    assert plan.kv_bytes_per_token("bfloat16", tp=16) == 32 * 1024  # duplicated KV heads
    assert (
        plan.layers[134].ffn_width == 425984 and plan.layers[134].attention is AttentionKind.NO_OP
    )
    assert round(plan.total_bytes("bfloat16") / 2**30, 1) == 472.0
    assert round(plan.fp8_bytes() / 2**30, 1) == 239.9


def test_super_facts():
    plan = preset_plan("super-49b")
    assert round(plan.total_params / 1e9, 2) == 49.87
    assert plan.num_layers == 80
    assert len(plan.attention_layers) == 49
    assert not plan.empty_layers
    assert plan.counts()["mlp"] == 80
    assert plan.kv_bytes_per_token("bfloat16") == 200_704


def test_mixed_preset_covers_every_kind():
    plan = preset_plan("mixed")
    kinds = {(layer.attention, layer.ffn) for layer in plan.layers}
    assert {a for a, _ in kinds} == set(AttentionKind)
    assert {f for _, f in kinds} == set(FfnKind)
    assert sorted({layer.kv_heads for layer in plan.attention_layers}) == [1, 2, 4, 8]
    assert plan.empty_layers


@pytest.mark.parametrize(
    ("mult", "hidden", "width"),
    [
        (0.4875, 16384, 5376),
        (0.975, 16384, 10752),
        (1.4625, 16384, 16128),
        (1.95, 16384, 21504),
        (2.4375, 16384, 26624),
        (2.925, 16384, 32000),
        (3.4125, 16384, 37376),
        (4.875, 16384, 53248),
        (27.5625, 16384, 301056),
        (31.40625, 16384, 343040),
        (36.5625, 16384, 399360),
        (39.0, 16384, 425984),
        (0.5, 8192, 2816),
        (1.0, 8192, 5632),
        (1.3125, 8192, 7168),
        (2.625, 8192, 14336),
        (3.28125, 8192, 17920),
        (5.25, 8192, 28672),
    ],
)
def test_intermediate_size_matches_reference_table(mult, hidden, width):
    assert intermediate_size(mult, hidden) == width


def test_intermediate_size_truncates_then_rounds_up():
    assert intermediate_size(1.0, 576) == 512  # 384 -> 512
    assert intermediate_size(4.0, 576) == 1536  # exactly 1536 stays


def test_every_preset_layer_agrees_with_the_rule():
    config = preset_config("ultra-253b")
    plan = parse_config(config)
    for block, layer in zip(config["block_configs"], plan.layers, strict=True):
        if layer.ffn is FfnKind.MLP:
            assert layer.ffn_width == intermediate_size(block["ffn"]["ffn_mult"], 16384)


def test_layer_params_sum_to_reference_breakdown():
    plan = preset_plan("ultra-253b")
    attention = sum(plan.layer_params(layer).attention for layer in plan.layers)
    mlp = sum(plan.layer_params(layer).ffn for layer in plan.layers)
    assert round(attention / 1e9, 3) == 36.507
    assert round(mlp / 1e9, 3) == 212.689
    assert plan.layer_params(plan.layers[0]).attention == 570_425_344


def test_plan_is_immutable():
    plan = preset_plan("mixed")
    with pytest.raises(AttributeError):
        plan.hidden_size = 1
    with pytest.raises(TypeError):
        plan.hf_config["hidden_size"] = 1


# ---- refusals ------------------------------------------------------------------------------
def _mixed() -> dict:
    return copy.deepcopy(preset_config("mixed"))


def test_unknown_model_type():
    config = _mixed() | {"model_type": "llama"}
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        parse_config(config, "x/config.json")


def test_deci_model_type_accepted():
    assert parse_config(_mixed() | {"model_type": "deci"}).num_layers == 12


def test_missing_block_configs():
    config = _mixed()
    del config["block_configs"]
    with pytest.raises(ConfigError, match="block_configs"):
        parse_config(config)


def test_block_count_mismatch():
    config = _mixed() | {"num_hidden_layers": 13}
    with pytest.raises(ConfigError, match="12 entries but num_hidden_layers is 13"):
        parse_config(config)


def test_heads_not_divisible_by_group():
    config = _mixed()
    config["block_configs"][4]["attention"]["n_heads_in_group"] = 3
    with pytest.raises(ConfigError, match=r"block_configs\[4\]\.attention\.n_heads_in_group = 3"):
        parse_config(config)


@pytest.mark.parametrize(
    ("part", "key", "value"),
    [
        ("attention", "sparsify", {"method": "2:4"}),
        ("attention", "window_length", 4096),
        ("attention", "num_sink_tokens", 4),
        ("attention", "unshifted_sink", True),
        ("ffn", "sparsify", {"method": "2:4"}),
    ],
)
def test_unimplemented_features_refused_naming_layer_and_field(part, key, value):
    config = _mixed()
    config["block_configs"][8][part][key] = value
    with pytest.raises(ConfigError, match=rf"block_configs\[8\]\.{part}\.{key}"):
        parse_config(config)


def test_sparsify_on_no_op_block_is_irrelevant():
    config = _mixed()
    config["block_configs"][5]["attention"]["sparsify"] = {"method": "2:4"}
    assert parse_config(config).layers[5].is_empty


def test_missing_ffn_mult():
    config = _mixed()
    config["block_configs"][0]["ffn"]["ffn_mult"] = None
    with pytest.raises(ConfigError, match=r"block_configs\[0\]\.ffn\.ffn_mult"):
        parse_config(config)


# ---- the schema check in front of the parser (builder.arch.schema) ---------------------------
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda c: c.update(hidden_size=True),
            "x/config.json: hidden_size: expected integer >= 1, got true",
        ),
        (
            lambda c: c.update(rms_norm_eps=float("nan")),
            "rms_norm_eps: expected finite number > 0, got NaN",
        ),
        (
            lambda c: c["rope_scaling"].update(factor="8"),
            'rope_scaling.factor: expected finite number > 0, got "8"',
        ),
        (
            lambda c: c["block_configs"][2]["ffn"].update(ffn_mult=0),
            "block_configs[2].ffn.ffn_mult: expected finite number > 0, got 0",
        ),
        (
            lambda c: c["block_configs"].append("no_op"),
            'block_configs[12]: expected an object, got "no_op"',
        ),
        (
            lambda c: c["block_configs"][1].pop("ffn"),
            "required field 'block_configs[1].ffn' is missing",
        ),
    ],
    ids=[
        "bool as integer",
        "nan",
        "nested string",
        "zero width",
        "entry as string",
        "missing part",
    ],
)
def test_schema_names_the_field_path(change, message):
    config = _mixed()
    change(config)
    with pytest.raises(ConfigError) as err:
        parse_config(config, "x/config.json")
    assert message in str(err.value)


def test_null_optional_fields_mean_the_default():
    """HF configs write null for "use the default" (Ultra: num_key_value_heads,
    intermediate_size)."""
    config = _mixed() | {
        "head_dim": None,
        "rope_scaling": None,
        "rms_norm_eps": None,
        "architectures": None,
    }
    plan = parse_config(config)
    assert plan.head_dim == plan.hidden_size // plan.num_attention_heads
    assert plan.rope_scaling is None and plan.rms_norm_eps == 1e-5
