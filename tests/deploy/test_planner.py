"""Plan figures against the reference (trtllm-checkpoint.md 9, nemotron-nas.md 7-10, benchmarks.md
5)."""

from __future__ import annotations

import itertools
import math

import pytest

from builder.arch import preset_plan, rank_tensors
from builder.deploy import balanced_partition, load_profile, plan_target, pp_balance
from builder.deploy.planner import GIB, rank_weights, stage_params
from builder.deploy.render import plan_text

TARGETS = ["h100x8-bf16", "h100x4-fp8", "b100x4-fp8", "h200x8-bf16", "h200x4-fp8"]


@pytest.fixture(scope="module")
def ultra():
    return preset_plan("ultra-253b")


@pytest.fixture(scope="module")
def super49():
    return preset_plan("super-49b")


def gib(n):
    return n / GIB


# ---- Ultra: the reference figures -------------------------------------------------------------
def test_ultra_tp8_bf16_weights_and_kv(ultra):
    result = plan_target(ultra, load_profile("h100x8-bf16"))
    data = result.to_dict()
    assert gib(data["weights_per_rank_max"]) == pytest.approx(62.4, abs=0.05)
    assert data["model"]["kv_bytes_per_token_total"] == 262_144
    assert data["kv_bytes_per_token_per_rank"] == 32 * 1024
    assert {r["tensors"] for r in data["per_rank"]} == {519}
    assert result.fits, result.verdict


def test_ultra_tp4_fp8_weights(ultra):
    data = plan_target(ultra, load_profile("h100x4-fp8")).to_dict()
    assert gib(data["weights_per_rank_max"]) == pytest.approx(62.9, abs=0.05)
    assert data["model"]["kv_bytes_per_token_total"] == 131_072
    assert data["fits"], data["verdict"]


@pytest.mark.parametrize(
    ("target", "overrides", "expected_gib", "tensors"),
    [
        ("h100x4-fp8", [("parallel.tp", 8), ("hardware.gpus_per_node", 8)], 33.4, 1325),
        ("h100x8-bf16", [("precision.use_parallel_embedding", True)], 59.0, 519),
        (
            "h100x4-fp8",
            [
                ("parallel.tp", 8),
                ("hardware.gpus_per_node", 8),
                ("precision.use_parallel_embedding", True),
            ],
            30.0,
            1325,
        ),
        ("h100x8-bf16", [("parallel.tp", 4)], 120.9, 519),
    ],
)
def test_ultra_other_layouts_match_the_size_table(ultra, target, overrides, expected_gib, tensors):
    profile = load_profile(target, overrides)
    weights = rank_weights(ultra, profile, 0)
    assert gib(weights.total) == pytest.approx(expected_gib, abs=0.05)
    assert weights.tensors == tensors


def test_ultra_bf16_on_tp4_h100_does_not_fit(ultra):
    result = plan_target(ultra, load_profile("h100x8-bf16", [("parallel.tp", 4)]))
    assert not result.fits
    assert "does not fit" in result.verdict and "120.9 GiB weights" in result.verdict
    assert "> 79.6 GiB per GPU" in result.verdict


def test_ultra_decode_bounds_match_benchmarks(ultra):
    cases = [  # (target, overrides, GB per GPU per step, ms per step) from benchmarks.md 5.1
        ("h100x8-bf16", [], 62.8, 18.8),
        ("h100x4-fp8", [], 63.3, 18.9),
        ("h100x4-fp8", [("parallel.tp", 8), ("hardware.gpus_per_node", 8)], 31.7, 9.5),
        ("h200x8-bf16", [], 62.8, 13.1),
    ]
    for target, overrides, gb, ms in cases:
        decode = plan_target(ultra, load_profile(target, overrides)).decode
        assert decode["bytes_read_per_gpu_per_step"] / 1e9 == pytest.approx(gb, abs=0.06), target
        assert decode["step_ms_batch1"] == pytest.approx(ms, abs=0.05), target
        assert decode["step_ms_at_concurrency"] > decode["step_ms_batch1"]


def test_kv_tokens_follow_the_fraction_of_free_memory(ultra):
    profile = load_profile("h100x4-fp8")
    result = plan_target(ultra, profile)
    block = profile.build.tokens_per_block
    for m in result.ranks:
        assert (
            m.free
            == int(profile.hardware.gpu_memory_gib * GIB) - m.weights - m.activations - m.reserve
        )
        assert m.kv_pool == int(profile.runtime.kv_cache_free_gpu_mem_fraction * m.free)
        assert m.kv_tokens % block == 0
        assert (
            m.kv_tokens * m.kv_bytes_per_token
            <= m.kv_pool
            < (m.kv_tokens + block) * m.kv_bytes_per_token
        )
    per_sequence = math.ceil((profile.runtime.isl + profile.runtime.osl) / block) * block
    assert result.sequences_fit == result.kv_tokens // per_sequence
    assert result.concurrency == min(result.sequences_fit, profile.build.max_batch_size)
    lower = plan_target(
        ultra, load_profile("h100x4-fp8", [("runtime.kv_cache_free_gpu_mem_fraction", 0.45)])
    )
    assert lower.kv_tokens == pytest.approx(result.kv_tokens / 2, rel=0.001)


def test_activation_estimate_scales_with_max_num_tokens(ultra):
    small = plan_target(ultra, load_profile("h100x4-fp8", [("build.max_num_tokens", 4096)]))
    big = plan_target(ultra, load_profile("h100x4-fp8"))
    logits = 64 * ultra.vocab_size * 4
    assert big.ranks[0].activations - logits == 2 * (small.ranks[0].activations - logits)
    # layer 134 (I = 425984) is the widest: 3 I / tp + 2 h elements per token, BF16
    assert big.ranks[0].activations - logits == 8192 * (3 * 425984 // 4 + 2 * 16384) * 2
    assert small.kv_tokens > big.kv_tokens


def test_kv_pool_too_small_for_one_sequence_is_a_problem(ultra):
    result = plan_target(ultra, load_profile("h100x8-bf16", [("hardware.gpu_memory_gib", 67.6)]))
    assert not result.fits
    assert "fewer than one max_seq_len=8192 sequence" in result.verdict


def test_impossible_tp_is_a_problem_not_a_crash(ultra):
    result = plan_target(
        ultra, load_profile("h100x8-bf16", [("parallel.tp", 3), ("hardware.gpus_per_node", 8)])
    )
    assert not result.fits
    assert "num_attention_heads 128 is not divisible by tp 3" in result.verdict
    assert result.to_dict()["per_rank"] == []


def test_workload_beyond_max_seq_len_is_flagged(ultra):
    result = plan_target(
        ultra, load_profile("h100x8-bf16", [("runtime.isl", 20000), ("runtime.osl", 2000)])
    )
    assert any("exceeds build.max_seq_len 8192" in w for w in result.warnings)


# ---- Super on every target -----------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_super_on_every_target(super49, target):
    profile = load_profile(target)
    result = plan_target(super49, profile)
    tp = profile.parallel.tp
    assert result.fits, result.verdict
    kv_total = 200_704 if profile.precision.kv_cache == "bf16" else 100_352
    assert result.model.kv_bytes_per_token(profile.kv_dtype) == kv_total
    assert {m.kv_bytes_per_token for m in result.ranks} == {kv_total // tp}
    # Sum over ranks, derived independently of rank_tensors: linears split once, lm_head split
    # (128256 divides by tp), embedding and norms replicated on every rank.
    norms = (
        super49.total_params
        - super49.linear_params
        - super49.embedding_params
        - super49.lm_head_params
    )
    replicated = tp * (super49.embedding_params + norms) + super49.lm_head_params
    if profile.fp8_weights:
        linear_tensors = sum(t.rule.linear for t in rank_tensors(super49, tp, 1, 0))
        scales = tp * linear_tensors * 8 + tp * len(super49.attention_layers) * 4
        expected = super49.linear_params + 2 * replicated + scales
    else:
        expected = 2 * (super49.linear_params + replicated)
    assert sum(m.weights for m in result.ranks) == expected


@pytest.mark.parametrize(
    ("overrides", "expected_gib"),
    [
        ([("parallel.tp", 1)], 92.9),
        ([("parallel.tp", 2)], 47.4),
        ([("parallel.tp", 4)], 24.7),
    ],
)
def test_super_bf16_sizes_match_reference(super49, overrides, expected_gib):
    profile = load_profile("h200x8-bf16", overrides)
    assert gib(rank_weights(super49, profile, 0).total) == pytest.approx(expected_gib, abs=0.05)


def test_super_fp8_tp1_matches_reference(super49):
    profile = load_profile("h200x4-fp8", [("parallel.tp", 1)])
    assert gib(rank_weights(super49, profile, 0).total) == pytest.approx(48.4, abs=0.05)


# ---- pipeline balance ---------------------------------------------------------------------------
def test_ultra_pp2_equal_layers_is_unbalanced(ultra):
    balance = pp_balance(ultra, 2)
    equal = balance["equal_layers"]
    assert [s["layers"] for s in equal] == [81, 81]
    assert equal[0]["layer_params"] / 1e9 == pytest.approx(106.7, abs=0.1)
    assert equal[1]["layer_params"] / 1e9 == pytest.approx(142.4, abs=0.1)
    assert [s["attention_layers"] for s in equal] == [41, 23]
    suggested = balance["suggested"]
    assert sum(balance["suggested_pp_partition"]) == 162
    assert max(s["params"] for s in suggested) < max(s["params"] for s in equal)


@pytest.mark.parametrize("pp", [2, 3, 4])
def test_balanced_partition_is_optimal(pp):
    plan = preset_plan("mixed")
    counts = balanced_partition(plan, pp)
    assert len(counts) == pp and sum(counts) == plan.num_layers and min(counts) >= 1

    def worst(starts):
        return max(s["params"] for s in stage_params(plan, list(starts)))

    best = min(
        worst((0, *cuts)) for cuts in itertools.combinations(range(1, plan.num_layers), pp - 1)
    )
    starts = [sum(counts[:s]) for s in range(pp)]
    assert worst(starts) == best


def test_pp2_plan_uses_each_stage_own_kv(ultra):
    profile = load_profile("h100x4-fp8", [("parallel.pp", 2), ("hardware.gpus_per_node", 8)])
    result = plan_target(ultra, profile)
    per_stage = {m.pp_rank: m.kv_bytes_per_token for m in result.ranks}
    # 41 and 23 attention layers, 2 FP8 KV heads per rank, K and V, head_dim 128
    assert per_stage == {0: 41 * 2 * 2 * 128, 1: 23 * 2 * 2 * 128}
    assert result.pipeline["suggested_pp_partition"] == balanced_partition(ultra, 2)


# ---- parallelism checks, host side, rendering
# -------------------------------------------------------
def test_tp_checks_report_duplicated_kv_heads(ultra):
    result = plan_target(
        ultra,
        load_profile(
            "h100x4-fp8", [("parallel.tp", 16), ("parallel.pp", 1), ("hardware.gpus_per_node", 16)]
        ),
    )
    assert len(result.tp["layers_with_duplicated_kv_heads"]) == 64
    assert result.tp["kv_heads_per_rank"] == [1]
    assert gib(result.ranks[0].weights) == pytest.approx(
        18.8, abs=0.05
    )  # FP8 TP16 row of the table
    assert any("duplicated" in w for w in result.warnings)


def test_host_plan_formulas(ultra):
    result = plan_target(ultra, load_profile("h100x8-bf16"))
    steps = result.host["steps"]
    embedding = 128256 * 16384 * 2  # the replicated embedding is the largest per-rank tensor
    assert steps["convert"]["host_ram"] == GIB + 2 * embedding
    assert steps["convert"]["reads"] == ultra.total_bytes("bfloat16")
    assert steps["convert"]["disk_written"] == sum(m.weights for m in result.ranks)
    layer134 = (3 * 16384 * 425984 + 16384) * 2  # MLP + its norm; gate/up are 13.96 GB each
    calib = 512 * 512 * 16384 * 2
    assert steps["quantize"]["host_ram"] == GIB + layer134 + 2 * calib
    assert steps["build"]["host_ram"] == 8 * 2 * result.ranks[0].weights
    assert all(step["fits_host_ram"] for step in steps.values())


def test_plan_text_renders_every_part(ultra):
    text = plan_text(plan_target(ultra, load_profile("b100x4-fp8")))
    for part in ("b100x4-fp8", "KV B per", "Summary", "Host side", "fits:"):
        assert part in text
