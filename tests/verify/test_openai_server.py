"""The openai runtime against a real OpenAI-compatible server: vLLM (CPU) serving the same
SmolLM2 weights as a plain Llama checkpoint, in fp32 like the golden. Slow: the server takes
1-3 minutes to start on 2 cores (once per session)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from builder.cli import main
from builder.verify.golden import Golden
from builder.verify.run import VerifyOptions, verify
from builder.verify.runtimes.openai import OpenAIRuntime

pytestmark = pytest.mark.slow


def test_vllm_reproduces_the_golden(openai_server, smollm2_golden, tmp_path, capsys):
    golden = Golden.load(smollm2_golden)
    runtime = OpenAIRuntime(openai_server, tokenizer=golden.tokenizer())
    assert runtime.score_mode == "prompt_logprobs" and runtime.ids_mode and runtime.ignore_eos
    assert set(runtime.capabilities.metrics()) >= {
        "kl_mean",
        "top1_agreement",
        "greedy_exact_match",
        "ppl_ratio",
    }
    result = verify(smollm2_golden, runtime, VerifyOptions(report=tmp_path))
    with capsys.disabled():
        print(f"\n{result.table}")
    m = result.metrics
    # Same fp32 weights, another engine's kernels: differences are fp32 rounding (relative
    # ~1e-6 on logits of magnitude ~30, i.e. ~1e-4 nats), far below anything FP8 does (~0.04).
    assert m["kl_mean"] < 1e-3 and abs(m["ppl_ratio"] - 1) < 1e-3
    assert m["top1_agreement"] >= 0.99  # only exact near-ties may flip
    assert m["greedy_prefix_fraction"] >= 0.75
    assert result.exit_code == 0


def test_cli_against_the_server(openai_server, smollm2_golden, tmp_path):
    args = [
        "verify",
        "--golden",
        str(smollm2_golden),
        "--runtime",
        "openai",
        "--url",
        openai_server,
        "--max-prompts",
        "1",
        "--report",
        str(tmp_path),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "prompt log-probs: prompt_logprobs" in result.output and "| kl_mean |" in result.output
