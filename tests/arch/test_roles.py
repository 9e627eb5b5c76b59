"""The role table: names read back to their roles, unmapped names raise, groups and
quantizers are what the FP8 formats expect."""

from __future__ import annotations

import pytest

from builder.arch import preset_plan
from builder.arch.tensors import (
    ROLES,
    Group,
    Role,
    UnknownTensorName,
    block_roles,
    fused_roles,
    group_roles,
    hf_kv_scale_name,
    hf_layer_of,
    hf_layer_prefix,
    hf_tensor_shapes,
    kv_quantizer,
    layer_rules,
    parse_hf_name,
    rank_tensors,
    split_hf_layer,
)


@pytest.mark.parametrize("preset", ["ultra-253b", "mixed"])
def test_every_hf_tensor_reads_back_to_its_role_and_layer(preset):
    plan = preset_plan(preset)
    seen = set()
    for name in hf_tensor_shapes(plan):
        tensor = parse_hf_name(name)
        assert tensor.suffix == "weight"
        assert ROLES[tensor.role].hf_weight(tensor.layer) == name
        seen.add(tensor.role)
        layer, rest = split_hf_layer(name)
        assert layer == hf_layer_of(name) == tensor.layer
        assert (hf_layer_prefix(layer) + rest if layer is not None else rest) == name
    if preset == "mixed":  # every block kind, untied lm_head: every role appears
        assert seen == set(Role)


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.3.self_attn.q_norm.weight",
        "model.layers.x.mlp.gate_proj.weight",
        "transformer.layers.0.attention.qkv.weight",  # a TensorRT-LLM name is not an HF one
        "model.embed_tokens.weight.extra",
        "lm_head",
    ],
)
def test_unmapped_names_raise(name):
    with pytest.raises(UnknownTensorName, match="no tensor role"):
        parse_hf_name(name)


def test_quantizer_and_scale_names_read_back():
    k = parse_hf_name(kv_quantizer("k", 7))
    assert (k.role, k.layer, k.suffix) == (Role.ATTN_K, 7, "k_bmm_quantizer")
    v = parse_hf_name(hf_kv_scale_name(Role.ATTN_V, 2))
    assert (v.role, v.layer, v.suffix) == (Role.ATTN_V, 2, "v_scale")
    gate = parse_hf_name(ROLES[Role.FFN_GATE].quantizers(4)[1])
    assert (gate.role, gate.layer, gate.suffix) == (Role.FFN_GATE, 4, "input_quantizer")
    assert split_hf_layer(ROLES[Role.ATTN_Q].quantizers(5)[0]) == (
        5,
        "self_attn.q_proj.weight_quantizer",
    )


def test_groups_fuse_and_share_scales():
    assert group_roles(Group.QKV) == (Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V)
    assert group_roles(Group.GATE_UP) == (Role.FFN_GATE, Role.FFN_UP)
    assert all(fused_roles(g) == group_roles(g) for g in Group)
    plan = preset_plan("mixed")
    gqa = next(layer for layer in plan.layers if layer.has_kv_cache and layer.ffn_width)
    qkv = next(rule for rule in layer_rules(gqa) if rule.roles == group_roles(Group.QKV))
    assert qkv.source_names(gqa.index) == tuple(
        ROLES[r].hf_weight(gqa.index) for r in group_roles(Group.QKV)
    )
    # gate and up stay two TensorRT-LLM tensors (fc, gate); the runtimes fuse them at load
    ffn_targets = [r.target_name(0) for r in layer_rules(gqa) if r.roles[0] in block_roles(gqa)]
    assert ROLES[Role.FFN_GATE].trtllm_weight(0) in ffn_targets
    assert ROLES[Role.FFN_UP].trtllm_weight(0) in ffn_targets


def test_only_cache_projections_carry_bmm_quantizers():
    with_bmm = {r for r, s in ROLES.items() if any("bmm" in q for q in s.quantizers(0))}
    assert with_bmm == {Role.ATTN_K, Role.ATTN_V}
    assert ROLES[Role.LM_HEAD].quantizers() == ()  # excluded from FP8


def test_rank_tensors_know_their_stage_local_index():
    plan = preset_plan("mixed")
    for item in rank_tensors(plan, 2, 3, 3):
        if item.layer is not None:
            assert item.name == item.rule.target_name(item.local)
        else:
            assert item.local is None
