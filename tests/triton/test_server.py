"""The generated engine repository served by a real tritonserver (nvidia-pytriton's Triton
2.51, CPU, loopback) with only tensorrt_llm replaced by the CPU executor stand-in: text
through the ensemble and the BLS model, over HTTP and gRPC, streaming included, equals
what the executor generates directly."""

from __future__ import annotations

import math
import re

import pytest

from builder.triton import load_tokenizer
from builder.triton.client import generate_grpc_stream, generate_http, generate_stream_http
from builder.triton.reference import greedy_generate

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def expected(tiny_build, one_torch_thread):
    """What the executor generates directly for each prompt (same fp32 computation, one thread,
    as in the server), and the texts a client receives: whole, and one token per response."""
    from builder.runtime import TrtllmCheckpointExecutor

    tokenizer = load_tokenizer(tiny_build.hf_dir)
    answers = {}
    with TrtllmCheckpointExecutor(tiny_build.checkpoint) as executor:
        for prompt in ("What is the capital of France?", "Paris"):
            generated = greedy_generate(
                executor, tokenizer.encode(prompt), MAX_TOKENS, tokenizer.eos_token_id
            )
            answers[prompt] = {
                "generated": generated,
                "text": tokenizer.decode(generated.tokens, skip_special_tokens=True),
                "chunks": [
                    tokenizer.decode([t], skip_special_tokens=True) for t in generated.tokens
                ],
                "accumulated": [
                    tokenizer.decode(generated.tokens[: i + 1], skip_special_tokens=True)
                    for i in range(len(generated.tokens))
                ],
            }
    return answers


def grpc_texts(responses) -> list[str]:
    return [r["text_output"].reshape(-1)[0].decode() for r in responses]


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_text_matches_the_executor_over_http_and_grpc(triton_server, expected, model, capsys):
    with capsys.disabled():
        print(
            f"\n  tritonserver ready in {triton_server.server.startup_seconds:.1f} s "
            f"(HTTP {triton_server.http_url}, gRPC {triton_server.grpc_url})"
        )
    for prompt, answer in expected.items():
        fields = {"text_input": prompt, "max_tokens": MAX_TOKENS}
        http = generate_http(triton_server.http_url, model, fields)
        assert http["text_output"] == answer["text"]
        grpc = grpc_texts(generate_grpc_stream(triton_server.grpc_url, model, fields))
        assert grpc == [answer["text"]]
        with capsys.disabled():
            print(
                f"  {model} {prompt!r} -> HTTP {http['text_output']!r}, gRPC {grpc[0]!r}, "
                f"executor {answer['text']!r}"
            )


@pytest.mark.parametrize(
    ("model", "kind"), [("ensemble", "chunks"), ("tensorrt_llm_bls", "accumulated")]
)
def test_streaming_sends_one_response_per_token(triton_server, expected, model, kind, capsys):
    """The ensemble streams each new token's text; the BLS model (accumulate_tokens) the text so
    far."""
    prompt = "What is the capital of France?"
    answer = expected[prompt]
    fields = {"text_input": prompt, "max_tokens": MAX_TOKENS, "stream": True}
    http = [
        event["text_output"]
        for event in generate_stream_http(triton_server.http_url, model, fields)
    ]
    grpc = grpc_texts(generate_grpc_stream(triton_server.grpc_url, model, fields))
    assert http == answer[kind]
    assert grpc == answer[kind]
    if kind == "accumulated":
        assert http[-1] == answer["text"]  # the last response is the whole answer
    with capsys.disabled():
        print(f"\n  {model} streamed {len(http)} responses over HTTP and gRPC: {http!r}")


def test_log_probs_match_the_executor(triton_server, expected):
    prompt = "What is the capital of France?"
    generated = expected[prompt]["generated"]
    response = generate_http(
        triton_server.http_url,
        "ensemble",
        {"text_input": prompt, "max_tokens": MAX_TOKENS, "return_log_probs": True},
    )
    # The same fp32 forward on the same weights; only the process differs, so agreement is to
    # fp32 rounding of a log-softmax over 261 logits (~1e-6 relative), 1e-4 leaves margin.
    assert response["output_log_probs"] == pytest.approx(generated.log_probs, rel=1e-4, abs=1e-5)
    assert response["cum_log_probs"] == pytest.approx(generated.cum_log_prob, rel=1e-4)
    assert all(lp <= 0 and math.isfinite(lp) for lp in response["output_log_probs"])


def test_llmapi_repository_loads_up_to_the_missing_tensorrt_llm(tiny_build, tmp_path):
    """The LLM-API repository through the real server: config.pbtxt is accepted, model.py is
    imported and its auto-complete applies model.yaml; loading stops only at `import
    tensorrt_llm`, which cannot be installed here."""
    from builder.triton import TritonOptions, read_build_record, write_repository
    from builder.triton.repository import MODELS_DIR
    from builder.triton.server import ServerFailed, ServerUnavailable, TritonServer, bundled_triton

    try:
        bundled_triton()
    except ServerUnavailable as err:
        pytest.skip(f"tritonserver cannot start here: {err}")
    out = tmp_path / "llmapi"
    write_repository(
        read_build_record(tiny_build.pytorch_dir),
        TritonOptions(tokenizer_dir=tiny_build.hf_dir, decoupled=True),
        out,
    )
    server = TritonServer(out / MODELS_DIR, auto_complete=True, extra_args=("--log-verbose=1",))
    with pytest.raises(ServerFailed, match="No module named 'tensorrt_llm'"):
        server.start(timeout=120)
    log = server.final_log
    assert "No module named 'tensorrt_llm'" in log, log
    assert "failed to read text proto" not in log
    # The model configuration the server logged after auto-complete: triton_config of model.yaml.
    completed = next(
        line
        for line in log.splitlines()
        if "model configuration" in line and "tensorrt_llm" in line
    )
    assert re.search(r'decoupled\\?": true', completed), completed


def test_only_tensorrt_llm_is_replaced_in_the_served_repository(triton_server):
    """What the server loaded is the generated repository byte for byte except tensorrt_llm,
    whose tensors, batch size and decoupled mode are the generated ones too."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from builder.triton.repository import MODELS_DIR

    generated, served = triton_server.out / MODELS_DIR, triton_server.served

    def files(root):  # the server's Python backend adds __pycache__ to what it loads
        found = (p.relative_to(root) for p in root.rglob("*") if p.is_file())
        return {p for p in found if "__pycache__" not in p.parts}

    kept = {p for p in files(generated) if p.parts[0] != "tensorrt_llm"}
    assert kept == {p for p in files(served) if p.parts[0] != "tensorrt_llm"}
    assert {p.parts[0] for p in kept} == {
        "preprocessing",
        "postprocessing",
        "ensemble",
        "tensorrt_llm_bls",
    }
    for path in kept:
        assert (served / path).read_bytes() == (generated / path).read_bytes(), path

    def config(root):
        text = (root / "tensorrt_llm" / "config.pbtxt").read_text()
        return text_format.Parse(text, model_config_pb2.ModelConfig())

    original, standin = config(generated), config(served)
    assert (original.backend, standin.backend) == ("tensorrtllm", "python")
    for field in ("input", "output", "max_batch_size", "model_transaction_policy", "name"):
        assert getattr(standin, field) == getattr(original, field), field
