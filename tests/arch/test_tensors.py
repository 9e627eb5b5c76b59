"""Tensor tables and per-rank layout, checked against the reference's published figures."""

from __future__ import annotations

import pytest

from builder.arch import (
    check_parallelism,
    hf_tensor_shapes,
    parallelism_problems,
    preset_plan,
    rank_tensors,
    stage_layers,
)
from builder.errors import ParallelismError


def test_hf_tensor_counts_match_published_checkpoints():
    assert len(hf_tensor_shapes(preset_plan("ultra-253b"))) == 647
    assert len(hf_tensor_shapes(preset_plan("super-49b"))) == 568


def test_ultra_tp8_rank_layout():
    plan = preset_plan("ultra-253b")
    tensors = {t.name: t.shape for t in rank_tensors(plan, 8, 1, 3)}
    assert len(tensors) == 519
    assert tensors["transformer.layers.0.attention.qkv.weight"] == (2304, 16384)
    assert tensors["transformer.layers.0.attention.dense.weight"] == (16384, 2048)
    assert tensors["transformer.layers.134.ffn.fc.weight"] == (53248, 16384)
    assert tensors["transformer.layers.134.ffn.proj.weight"] == (16384, 53248)
    assert tensors["lm_head.weight"] == (16032, 16384)
    assert not any(name.startswith("transformer.layers.9.") for name in tensors)
    gib = sum(t.numel for t in rank_tensors(plan, 8, 1, 0)) * 2 / 2**30
    assert round(gib, 1) == 62.4


def test_ultra_tp16_duplicates_kv_heads():
    plan = preset_plan("ultra-253b")
    tensors = {t.name: t.shape for t in rank_tensors(plan, 16, 1, 15)}
    assert tensors["transformer.layers.0.attention.qkv.weight"] == (1280, 16384)


def test_super_qkv_shapes():
    plan = preset_plan("super-49b")
    assert {t.name: t.shape for t in rank_tensors(plan, 2, 1, 0)}[
        "transformer.layers.0.attention.qkv.weight"
    ] == (5120, 8192)
    assert {t.name: t.shape for t in rank_tensors(plan, 8, 1, 0)}[
        "transformer.layers.0.attention.qkv.weight"
    ] == (1280, 8192)


def test_pipeline_stages_use_local_indices_and_place_globals():
    plan = preset_plan("mixed")
    first = [t.name for t in rank_tensors(plan, 2, 3, 0)]
    last = [t.name for t in rank_tensors(plan, 2, 3, 5)]
    middle = [t.name for t in rank_tensors(plan, 2, 3, 2)]
    assert first[0] == "transformer.vocab_embedding.weight" and "lm_head.weight" not in first
    assert last[-2:] == ["transformer.ln_f.weight", "lm_head.weight"]
    assert "transformer.vocab_embedding.weight" not in middle and "lm_head.weight" not in middle
    assert stage_layers(plan, 3, 1) == range(4, 8)
    # global layer 4 (GQA + linear FFN) is local layer 0 of stage 1
    assert "transformer.layers.0.ffn.weight" in middle
    assert not any(".layers.4." in name for name in middle)


def test_ultra_pp2_stage_balance_is_uneven():
    plan = preset_plan("ultra-253b")
    stages = [
        sum(plan.layer_params(plan.layers[i]).total for i in stage_layers(plan, 2, r))
        for r in range(2)
    ]
    assert [
        len([i for i in stage_layers(plan, 2, r) if plan.layers[i].kv_heads]) for r in range(2)
    ] == [41, 23]
    assert stages[0] < stages[1]


@pytest.mark.parametrize(
    ("tp", "pp", "fragment"),
    [
        (3, 1, "num_attention_heads 16 is not divisible by tp 3"),
        (1, 5, "num_hidden_layers 12 is not divisible by pp 5"),
        (32, 1, "num_attention_heads"),
    ],
)
def test_impossible_layouts_named(tp, pp, fragment):
    plan = preset_plan("mixed")
    assert any(fragment in p for p in parallelism_problems(plan, tp, pp))
    with pytest.raises(ParallelismError, match=fragment):
        check_parallelism(plan, tp, pp)


def test_kv_heads_must_divide_or_be_divided_by_tp():
    plan = preset_plan("ultra-253b")
    problems = parallelism_problems(plan, 32, 1)  # 128 heads / 32 fine, kv 8 divides 32: fine
    assert problems == []
    problems = parallelism_problems(preset_plan("mixed"), 16, 1)
    assert problems == []
    from builder.arch import parse_config, preset_config

    config = preset_config("mixed")
    config["num_attention_heads"] = 24
    config["hidden_size"] = 384
    for block in config["block_configs"]:
        if block["attention"]["n_heads_in_group"]:
            block["attention"]["n_heads_in_group"] = 8  # 3 KV heads
    odd = parse_config(config)
    assert any("3 KV heads cannot be split over tp 2" in p for p in parallelism_problems(odd, 2, 1))
