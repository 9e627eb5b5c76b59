"""The executor's KV cache: greedy decode through it equals the full-sequence forward.

The reference for every sequence is the executor's own full forward on that sequence alone
(unpadded, no cache; it matches the native reference model to fp32 rounding, see
test_executor.py), re-run on the growing sequence at every step.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from builder.arch import AttentionKind
from builder.arch.tensors import KV_CACHE_SCALE, kv_heads_per_rank, stage_layers
from builder.convert import convert_checkpoint
from builder.io.trtllm_checkpoint import rank_file_name, read_trtllm_config
from builder.runtime import TrtllmCheckpointExecutor

NEW_TOKENS = 6
PROMPT_LENGTHS = (7, 11, 1)  # different lengths: left padding, one single-token prompt


def prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def reduction_order_tolerance(directory) -> float:
    """Relative logit tolerance between two fp32 computations of the same products summed in
    different orders (batched vs single rows, a cache of n keys vs a causal n x n product):
    each reduction of length n errs by ~sqrt(n) eps, and the errors of the layers add up."""
    plan = read_trtllm_config(directory)[1]
    widest = max([plan.hidden_size, *(layer.ffn_width or 0 for layer in plan.layers)])
    return plan.num_layers * math.sqrt(widest) * torch.finfo(torch.float32).eps


def full_forward_greedy(
    executor, prompt: list[int], steps: int
) -> tuple[list[int], list[torch.Tensor]]:
    seq, logits = list(prompt), []
    for _ in range(steps):
        last = executor(torch.tensor(seq))[-1]
        logits.append(last)
        seq.append(int(last.argmax()))
    return seq[len(prompt) :], logits


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def check_against_full_forward(directory, tolerance: float) -> None:
    with TrtllmCheckpointExecutor(directory) as executor:
        batch = prompts(executor.plan.vocab_size)
        cached = executor.greedy(batch, NEW_TOKENS, keep_logits=True)
        for b, prompt in enumerate(batch):
            tokens, logits = full_forward_greedy(executor, prompt, NEW_TOKENS)
            assert cached.tokens[b] == tokens, f"sequence {b}"
            worst = max(relative(cached.logits[s][b], logits[s]) for s in range(NEW_TOKENS))
            assert worst <= tolerance, f"sequence {b}: relative logit error {worst:.2e}"


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_cached_greedy_equals_full_forward(tmp_path, mixed_ckpt_fp32, tp, pp):
    """Every block kind, KV heads 1/2/4/8 (duplicated at tp 2 in the 1-head layers)."""
    out = tmp_path / "trt"
    convert_checkpoint(mixed_ckpt_fp32, out, tp, pp)
    check_against_full_forward(out, reduction_order_tolerance(out))


def test_cache_holds_each_attention_layer_at_its_own_kv_heads(tmp_path, mixed_ckpt_fp32):
    tp, pp, batch, capacity = 2, 2, 3, 10
    out = tmp_path / "trt"
    convert_checkpoint(mixed_ckpt_fp32, out, tp, pp)
    with TrtllmCheckpointExecutor(out) as executor:
        cache = executor.new_cache(batch, capacity)
        plan = executor.plan
        expected = {}
        for pp_rank in range(pp):
            for index in stage_layers(plan, pp, pp_rank):
                layer = plan.layers[index]
                if layer.attention is AttentionKind.ATTENTION:
                    for rank in executor.stage_ranks(pp_rank):
                        expected[rank, index] = (
                            batch,
                            kv_heads_per_rank(layer.kv_heads, tp),
                            capacity,
                            plan.head_dim,
                        )
        assert {key: tuple(t.shape) for key, t in cache.keys.items()} == expected
        assert len({shape[1] for shape in expected.values()}) > 1  # heterogeneous head counts
        assert (
            len({index for _, index in expected}) < plan.num_layers
        )  # no-op / linear layers: none
        # the planner's KV bytes per token per rank, times ranks, batch and capacity
        assert cache.nbytes == tp * plan.kv_bytes_per_token("float32", tp) * batch * capacity


def test_generate_stops_each_sequence_at_eos_and_no_cache_agrees(tmp_path, mixed_ckpt_fp32):
    out = tmp_path / "trt"
    convert_checkpoint(mixed_ckpt_fp32, out, tp=1)
    with TrtllmCheckpointExecutor(out) as executor:
        batch = prompts(executor.plan.vocab_size, seed=1)
        free = executor.generate(batch, NEW_TOKENS)
        assert [len(t) for t in free] == [NEW_TOKENS] * len(batch)
        assert executor.greedy(batch, NEW_TOKENS, use_cache=False).tokens == free
        eos = free[0][2]  # the first sequence emits it at step 3
        stopped = executor.generate(batch, NEW_TOKENS, eos_id=eos)
        for full, cut in zip(free, stopped, strict=True):
            end = full.index(eos) + 1 if eos in full else len(full)
            assert cut == full[:end]
        assert len(stopped[0]) == 3


def with_fp8_kv_cache(directory, scale: float) -> None:
    """Turns a converted checkpoint into one with an FP8 KV cache (kv_cache_quant_algo FP8 and
    a kv_cache_scaling_factor per attention layer and rank, as ModelOpt exports)."""
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization"] = {**(config.get("quantization") or {}), "kv_cache_quant_algo": "FP8"}
    config_path.write_text(json.dumps(config, indent=2))
    plan = read_trtllm_config(directory)[1]
    tp, pp = config["mapping"]["tp_size"], config["mapping"]["pp_size"]
    for rank in range(tp * pp):
        path = directory / rank_file_name(rank)
        tensors = load_file(path)
        for local, index in enumerate(stage_layers(plan, pp, rank // tp)):
            if plan.layers[index].attention is AttentionKind.ATTENTION:
                name = f"transformer.layers.{local}.attention.{KV_CACHE_SCALE}"
                tensors[name] = torch.tensor([scale], dtype=torch.float32)
        save_file(tensors, path)


def test_fp8_kv_cache_equals_the_full_forward_fp8_round_trip(tmp_path, mixed_ckpt_fp32):
    """e4m3 storage with kv_cache_scaling_factor gives the values the full forward's round trip
    gives. Summation-order noise (~1e-7) can move an element across an e4m3 rounding boundary
    (one step: 2^-3 relative), rarely; the cache must stay far closer to the FP8 forward than
    FP8 KV itself is to exact KV (<= 5% of that effect) and pick the same tokens."""
    out = tmp_path / "trt"
    convert_checkpoint(mixed_ckpt_fp32, out, tp=2)
    batch = prompts(1000)
    with TrtllmCheckpointExecutor(out) as executor:
        exact = executor(torch.tensor(batch[1]))
    with_fp8_kv_cache(out, scale=1 / 64)
    with TrtllmCheckpointExecutor(out) as executor:
        assert executor.kv_cache_fp8
        assert next(iter(executor.new_cache(1, 4).keys.values())).dtype == torch.float8_e4m3fn
        fp8_effect = relative(executor(torch.tensor(batch[1])), exact)
    assert fp8_effect > 1e-3  # FP8 KV really changes the result
    check_against_full_forward(out, max(reduction_order_tolerance(out), 0.05 * fp8_effect))
