"""The native reference model against an independent formulation, and its transformers plumbing."""

from __future__ import annotations

import math

import pytest
import torch

from builder.arch import AttentionKind, hf_tensor_shapes, load_plan
from builder.model import DeciLMForCausalLM, load_reference_model
from tests.tolerances import BF16_UNIT_ROUNDOFF, FP32_UNIT_ROUNDOFF, ROUNDINGS_PER_BLOCK

# Numeric comparisons run on one torch thread, so summation order does not depend on the
# machine's core count (see one_torch_thread in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fp32_error_bound(model_or_plan, scale: float) -> float:
    """Largest |logit difference| two fp32 evaluations of the same model may show (or fp32
    against a float64 formulation): at most one unit roundoff per rounded operation, adding
    at most linearly along the path (blocks x ROUNDINGS_PER_BLOCK, plus the final norm and
    lm_head), relative to the logits' scale. Derived, so it holds on any CPU; a real mistake
    (wrong KV head, missing rope scaling, mask off by one) moves logits by O(0.1 * scale).
    """
    plan = getattr(model_or_plan, "plan", model_or_plan)
    return (len(plan.layers) * ROUNDINGS_PER_BLOCK + 2) * FP32_UNIT_ROUNDOFF * scale


def scale_of(logits: torch.Tensor) -> float:
    return logits.abs().max().item()


def sample_ids(vocab: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def mixed_sdpa(mixed_ckpt_fp32):
    return load_reference_model(mixed_ckpt_fp32, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def mixed_eager(mixed_ckpt_fp32):
    return load_reference_model(mixed_ckpt_fp32, attn_implementation="eager")


def greedy_without_cache(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        logits = model(ids, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


# ---- the math --------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_logits_match_independent_forward(
    mixed_ckpt_fp32, mixed_sdpa, mixed_eager, reference_logits, impl
):
    """Every block kind and KV-head count 1/2/4/8, llama3 RoPE, fp32 vs a float64 formulation."""
    plan = load_plan(mixed_ckpt_fp32)
    assert {layer.kv_heads for layer in plan.attention_layers} == {1, 2, 4, 8}
    counts = plan.counts()
    assert counts["linear_attention"] and counts["linear_ffn"] and counts["empty"]
    assert plan.rope_scaling["rope_type"] == "llama3"
    model = mixed_sdpa if impl == "sdpa" else mixed_eager
    ids = sample_ids(plan.vocab_size, 2, 24)
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    for row in range(ids.shape[0]):
        expected = reference_logits(mixed_ckpt_fp32, ids[row].tolist())
        diff = (logits[row].double() - expected).abs().max().item()
        assert diff <= fp32_error_bound(plan, scale_of(expected)), (
            f"sequence {row}: max abs diff {diff}"
        )


def test_sdpa_equals_eager(mixed_sdpa, mixed_eager):
    ids = sample_ids(mixed_sdpa.config.vocab_size, 2, 17, seed=1)
    with torch.no_grad():
        eager = mixed_eager(ids, use_cache=False).logits
        diff = (mixed_sdpa(ids, use_cache=False).logits - eager).abs().max()
    assert diff.item() <= fp32_error_bound(mixed_sdpa, scale_of(eager))


def test_cached_decoding_matches_full_forward(mixed_sdpa):
    """Prefill then one token at a time through the KV cache gives the full-sequence logits."""
    ids = sample_ids(mixed_sdpa.config.vocab_size, 1, 12, seed=2)
    with torch.no_grad():
        full = mixed_sdpa(ids, use_cache=False).logits
        out = mixed_sdpa(ids[:, :5], use_cache=True)
        steps = [out.logits]
        cache = out["cache"] if "cache" in out else out["past_key_values"]  # 5.2x renamed it
        for t in range(5, ids.shape[1]):
            out = mixed_sdpa(ids[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    diff = (torch.cat(steps, dim=1) - full).abs().max().item()
    assert diff <= fp32_error_bound(mixed_sdpa, scale_of(full))
    # One cache entry per attention layer, none for linear or no-op blocks.
    attention_layers = len(mixed_sdpa.plan.attention_layers)
    assert len(cache.layers) == attention_layers
    assert all(layer.keys.shape[-2] == ids.shape[1] for layer in cache.layers)


@pytest.mark.parametrize("fixture", ["mixed_ckpt_fp32", "ffn_first_ckpt"])
def test_generate_with_cache_equals_greedy_without(fixture, request):
    ckpt = request.getfixturevalue(fixture)
    model = load_reference_model(ckpt)
    assert (model.plan.layers[0].attention is AttentionKind.ATTENTION) == (
        fixture == "mixed_ckpt_fp32"
    )
    ids = sample_ids(model.config.vocab_size, 1, 6, seed=3)
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None)
        uncached = greedy_without_cache(model, ids, 10)
    assert torch.equal(cached, uncached)


def test_left_padding_is_masked(mixed_sdpa, mixed_eager):
    """A left-padded row gives the same last-token logits as the same row alone."""
    ids = sample_ids(mixed_sdpa.config.vocab_size, 1, 9, seed=4)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    for model in (mixed_sdpa, mixed_eager):
        with torch.no_grad():
            alone = model(ids, use_cache=False).logits[:, -1]
            batched = model(
                padded, attention_mask=mask, position_ids=position_ids, use_cache=False
            ).logits[:, -1]
        diff = (alone - batched).abs().max().item()
        assert diff <= fp32_error_bound(model, scale_of(alone))


def test_bf16_checkpoint_runs_close_to_fp32(ultra_ckpt):
    """The Ultra pattern (FFN-fusion widths, empty blocks) in bf16 tracks its fp32 twin.

    bf16 rounding errors are independent and of either sign, so their norm-wise effect on
    the logits grows like a random walk: e ~ sqrt(n) * 2^-9 for n rounded operations along
    the path (about 0.036 for these 24 blocks). The cosine of two vectors a relative
    distance e apart is at least 1 - e^2 / 2; the bound allows four times that e. A wrong
    cast or a weight read in the wrong dtype gives unrelated logits (cosine near 0).
    """
    bf16 = load_reference_model(ultra_ckpt, dtype=torch.bfloat16)
    fp32 = load_reference_model(ultra_ckpt, dtype=torch.float32)
    assert next(bf16.parameters()).dtype == torch.bfloat16
    ids = sample_ids(bf16.config.vocab_size, 1, 16, seed=5)
    with torch.no_grad():
        low = bf16(ids, use_cache=False).logits.float()
        high = fp32(ids, use_cache=False).logits
    assert torch.isfinite(low).all()
    cosine = torch.nn.functional.cosine_similarity(low.flatten(), high.flatten(), dim=0)
    roundings = len(fp32.plan.layers) * ROUNDINGS_PER_BLOCK + 2
    allowed = 4 * math.sqrt(roundings) * BF16_UNIT_ROUNDOFF
    assert cosine.item() >= 1 - allowed**2 / 2


# ---- structure ---------------------------------------------------------------------------------
def test_parameters_are_exactly_the_checkpoint_tensors(mixed_ckpt_fp32, mixed_sdpa):
    plan = load_plan(mixed_ckpt_fp32)
    shapes = {name: tuple(p.shape) for name, p in mixed_sdpa.named_parameters()}
    assert shapes == hf_tensor_shapes(plan)
    for layer, module in zip(plan.layers, mixed_sdpa.model.layers, strict=True):
        own = sum(p.numel() for p in module.parameters())
        assert own == plan.layer_params(layer).total
        if layer.is_empty:
            assert own == 0 and module.input_layernorm is None and module.mlp is None


def test_one_decoder_class_with_plain_linears(mixed_sdpa):
    """What ModelOpt relies on: homogeneous layers, nn.Linear, '*Attention' only for GQA."""
    assert len({type(layer) for layer in mixed_sdpa.model.layers}) == 1
    for name, module in mixed_sdpa.named_modules():
        if name.endswith(("_proj", "linear_attn", "linear_mlp", "lm_head")):
            assert type(module) is torch.nn.Linear, name
        if type(module).__name__.endswith("Attention"):
            assert hasattr(module, "k_proj"), name
    indices = [
        layer.self_attn.layer_idx
        for layer in mixed_sdpa.model.layers
        if hasattr(layer.self_attn, "k_proj")
    ]
    assert indices == list(range(len(indices)))


def test_save_pretrained_writes_the_published_layout(mixed_sdpa, tmp_path):
    import json

    mixed_sdpa.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"]
    assert config["model_type"] == "nemotron-nas"
    assert config["rope_theta"] == 500000.0 and config["rope_scaling"]["rope_type"] == "llama3"
    assert "rope_parameters" not in config and "auto_map" not in config
    assert isinstance(config["block_configs"][0]["attention"], dict)
    assert load_plan(tmp_path / "saved").layers == mixed_sdpa.plan.layers
    reloaded = DeciLMForCausalLM.from_pretrained(tmp_path / "saved")
    ids = sample_ids(mixed_sdpa.config.vocab_size, 1, 8, seed=6)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, mixed_sdpa(ids).logits)


def test_block_configs_are_attribute_dataclasses(mixed_sdpa):
    """ModelOpt's TRT-LLM export calls dataclasses.asdict on each block config."""
    from dataclasses import asdict

    blocks = mixed_sdpa.config.block_configs
    assert blocks[2].attention.replace_with_linear is True
    assert asdict(blocks[0])["attention"]["n_heads_in_group"] == 2
