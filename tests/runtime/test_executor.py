"""The TensorRT-LLM checkpoint executor reproduces the native reference model's logits."""

from __future__ import annotations

import pytest
import torch

from builder.arch import load_plan
from builder.convert import convert_checkpoint
from builder.errors import ParallelismError
from builder.runtime import (
    TrtllmCheckpointExecutor,
    compare_logits,
    compare_with_reference,
    rope_inv_freq,
)
from builder.runtime.compare import prompt_ids, reference_logits
from tests.tolerances import (
    BF16_UNIT_ROUNDOFF,
    FP32_UNIT_ROUNDOFF,
    ROUNDINGS_PER_BLOCK,
    fp32_tolerance,
)


def layers_of(checkpoint) -> int:
    return len(load_plan(checkpoint).layers)


def token_ids(vocab: int, seq: int = 12, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def mixed_reference(mixed_ckpt_fp32):
    ids = token_ids(1000)
    return ids, reference_logits(mixed_ckpt_fp32, ids, torch.float32)


@pytest.fixture(scope="module")
def ultra_reference(ultra_ckpt):
    ids = token_ids(1000, seq=10)
    return ids, reference_logits(ultra_ckpt, ids, torch.float32)


def run(directory, ids, dtype=torch.float32) -> torch.Tensor:
    with TrtllmCheckpointExecutor(directory, dtype=dtype) as executor:
        return executor(ids)


@pytest.mark.parametrize("pp", [1, 2])
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_mixed_fp32_matches_reference(tmp_path, mixed_ckpt_fp32, mixed_reference, tp, pp):
    """Every block kind, KV heads 1-8 (duplicated at tp 2-8 in the 1- and 2-head layers)."""
    ids, expected = mixed_reference
    convert_checkpoint(mixed_ckpt_fp32, tmp_path / "trt", tp, pp)
    result = compare_logits(run(tmp_path / "trt", ids), expected)
    assert result.relative_error <= fp32_tolerance(layers_of(mixed_ckpt_fp32)), result
    assert result.argmax_agreement == 1.0


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 2), (4, 1), (8, 2)])
def test_ultra_pattern_fp32_matches_reference(tmp_path, ultra_ckpt, ultra_reference, tp, pp):
    """24 Ultra layers (empty blocks, FFN-only blocks, FFN-fusion widths); bf16 weights upcast."""
    ids, expected = ultra_reference
    convert_checkpoint(ultra_ckpt, tmp_path / "trt", tp, pp, dtype="float32")
    result = compare_logits(run(tmp_path / "trt", ids), expected)
    assert result.relative_error <= fp32_tolerance(layers_of(ultra_ckpt)), result


def test_bf16_matches_reference_within_bf16_rounding(tmp_path, mixed_ckpt):
    """Same bf16 weights, the executor and the reference both computing in bf16.

    What the test means: the executor's bf16 path computes the same function as the
    reference model's bf16 path, so its error against the fp32 result is bf16 rounding and
    nothing else. The bound is relative to the reference's own bf16 error e_ref =
    rel(ref16, ref32) measured in the same run on the same CPU, so whatever bf16 kernels this
    CPU has move both sides alike, and it holds on any CPU:

      rel(exec16, ref32) <= 2 * e_ref + 2^-8

    - factor 2: at tp > 1 each row-parallel linear (o_proj, down_proj, linear replacements)
      rounds tp partial sums to bf16 before adding them, which at most doubles the number of
      bf16 roundings along any path (one rounding of the partial, one of the sum, where the
      reference rounds once); rounding errors accumulate at most linearly in their count, so
      the error is at most twice the reference's. At tp 1 the math is the reference's, and
      the logits are checked bit for bit.
    - 2^-8: the logits themselves are rounded to bf16 on each side independently; two values
      an epsilon apart can round to neighbouring bf16 numbers, one bf16 ulp = 2^-8 relative
      at the largest logit, whatever the error before the rounding.

    Against the bf16 reference the triangle inequality then gives rel(exec16, ref16) <=
    3 * e_ref + 2^-8 (checked too: it is what a user comparing two bf16 runs sees).

    e_ref itself is checked to be rounding-sized: above 10 * fp32_tolerance (bf16 compute
    happened: an fp32 path stays below fp32_tolerance), and below the linear worst case of
    one bf16 unit roundoff per rounding along the path (blocks x ROUNDINGS_PER_BLOCK, plus the
    final norm and lm_head). Numeric tests run on one torch thread (tests/runtime/conftest.py)
    so a run's summation order does not depend on the machine's core count.
    """
    ids = token_ids(1000)
    reference32 = reference_logits(mixed_ckpt, ids, torch.float32)
    reference16 = reference_logits(mixed_ckpt, ids, torch.bfloat16)
    e_ref = compare_logits(reference16, reference32).relative_error
    num_layers = layers_of(mixed_ckpt)
    worst_case = (num_layers * ROUNDINGS_PER_BLOCK + 2) * BF16_UNIT_ROUNDOFF
    assert 10 * fp32_tolerance(num_layers) < e_ref < worst_case
    final_rounding = 2 * BF16_UNIT_ROUNDOFF  # one bf16 ulp, relative
    for tp, pp in [(1, 1), (2, 1), (4, 2)]:
        out = tmp_path / f"trt{tp}{pp}"
        convert_checkpoint(mixed_ckpt, out, tp, pp)
        logits = run(out, ids, torch.bfloat16)
        if tp == 1:
            assert torch.equal(logits, reference16)
        e_exec = compare_logits(logits, reference32).relative_error
        assert e_exec <= 2 * e_ref + final_rounding, (tp, pp, e_exec, e_ref)
        e_pair = compare_logits(logits, reference16).relative_error
        assert e_pair <= 3 * e_ref + final_rounding, (tp, pp, e_pair, e_ref)


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_ckpt):
    ids = prompt_ids(smollm2_ckpt, "The capital of France is")
    return ids, reference_logits(smollm2_ckpt, ids, torch.float32)


@pytest.mark.parametrize("tp, pp", [(1, 1), (3, 2)])
def test_real_smollm2_matches_reference(tmp_path, smollm2_ckpt, smollm2_reference, tp, pp):
    """The real SmolLM2-135M (9 heads, 3 KV heads: tp 1, 3 or 9 only), on a real prompt."""
    ids, expected = smollm2_reference
    out = tmp_path / "trt"
    convert_checkpoint(smollm2_ckpt, out, tp, pp)
    result = compare_logits(run(out, ids), expected)
    assert result.relative_error <= fp32_tolerance(layers_of(smollm2_ckpt)), result
    assert result.argmax_agreement == 1.0 and result.tokens >= 5


def test_compare_with_reference_for_the_demo(tmp_path, mixed_ckpt_fp32):
    """The one-call API the demo uses: prompt through the checkpoint's tokenizer, both models."""
    out = tmp_path / "trt"
    convert_checkpoint(mixed_ckpt_fp32, out, tp=2)
    result = compare_with_reference(out, mixed_ckpt_fp32, prompt="Hello, Nemotron!")
    assert result.tokens == len("Hello, Nemotron!")  # byte-level tokenizer: one token per byte
    assert (
        result.relative_error <= fp32_tolerance(layers_of(mixed_ckpt_fp32))
        and result.max_abs_error > 0
    )


def test_smollm2_refuses_a_tp_that_does_not_divide_its_heads(tmp_path, smollm2_ckpt):
    with pytest.raises(ParallelismError, match="num_attention_heads 9 is not divisible by tp 2"):
        convert_checkpoint(smollm2_ckpt, tmp_path / "trt", tp=2)


def test_a_missing_linear_weight_is_named_when_the_checkpoint_is_opened(tmp_path, mixed_ckpt):
    """Each linear's format is read from its stored tensors at load, so a rank file without a
    linear's weight is refused then, naming the file and the tensor (not mid-forward)."""
    from safetensors.torch import load_file, save_file

    from builder.errors import UserError

    out = tmp_path / "trt"
    convert_checkpoint(mixed_ckpt, out, tp=2)
    rank1 = out / "rank1.safetensors"
    tensors = load_file(str(rank1))
    name = next(n for n in sorted(tensors) if n.endswith("ffn.proj.weight"))
    del tensors[name]
    save_file(tensors, str(rank1))
    with pytest.raises(UserError, match=rf"rank1\.safetensors: tensor '{name}' unavailable"):
        TrtllmCheckpointExecutor(out)


def test_llama3_rope_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {
        "rope_type": "llama3",
        "factor": 16.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config = LlamaConfig(
        hidden_size=2048, num_attention_heads=16, rope_theta=500000.0, rope_scaling=scaling
    )
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours = rope_inv_freq(128, 500000.0, scaling)
    # Each frequency is a few fp32 operations (power, division, interpolation) in either
    # implementation: at most 16 roundings of 2^-24 each apart, whatever their order.
    assert torch.allclose(ours, expected, rtol=16 * FP32_UNIT_ROUNDOFF, atol=0)
    assert not torch.allclose(ours, rope_inv_freq(128, 500000.0, None))  # scaling does something
