"""`builder verify --runtime triton` against the real tritonserver serving a generated repository.

The served `tensorrt_llm` model is the executor stand-in on the same fp32 weights the golden
was made from, so its greedy continuations must equal the golden's token for token (the
argmax of two fp32 evaluations of one function; the synthetic model's logits have no ties at
this size). The ids interface is used: the byte tokenizer cannot round-trip the random bytes a
synthetic model emits through text.
"""

from __future__ import annotations

import pytest

from builder.verify.golden import GoldenSettings, build_golden
from builder.verify.run import VerifyOptions, verify
from builder.verify.runtimes import RuntimeArgs, make_runtime


@pytest.fixture(scope="module")
def tiny_golden(tiny_build, tmp_path_factory):
    settings = GoldenSettings(
        prompts="chat",
        windows=0,
        seq_len=32,
        chat_prompts=2,
        continuation=6,
        probe_len=8,
        dtype="float32",
    )
    return build_golden(tiny_build.hf_dir, tmp_path_factory.mktemp("golden") / "tiny", settings)


def test_verify_through_the_triton_generate_endpoint(triton_server, tiny_golden, tmp_path):
    runtime = make_runtime("triton", RuntimeArgs(url=triton_server.http_url, model="tensorrt_llm"))
    assert runtime.capabilities.greedy and not runtime.capabilities.prompt_scores
    result = verify(tiny_golden, runtime, VerifyOptions(report=tmp_path / "report"))
    print(result.table)
    assert result.metrics["greedy_exact_match"] == 1.0
    assert result.record.runtime == "triton" and result.record_path.is_file()
