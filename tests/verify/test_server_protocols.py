"""Protocol layers of the server runtimes on recorded responses (Triton generate, OpenAI
shapes), and the trtllm runtime's error when TensorRT-LLM is absent."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from builder.cli import main
from builder.errors import UserError
from builder.verify.runtimes import openai, triton

DATA = json.loads((Path(__file__).parent / "data" / "triton_generate.json").read_text())


@pytest.fixture(scope="module")
def tokenizer(mixed_ckpt_fp32):
    from builder.quantize.calib import load_tokenizer

    return load_tokenizer(mixed_ckpt_fp32)


def test_triton_interfaces_and_request_bodies():
    assert triton.interface_of(DATA["ensemble_metadata"]) == "text"
    assert triton.interface_of(DATA["trtllm_metadata"]) == "ids"
    with pytest.raises(UserError, match="neither text_input nor input_ids"):
        triton.interface_of({"name": "x", "inputs": [{"name": "INPUT0"}]})
    assert triton.generate_body("text", "Hi", [1, 2], 8) == {
        "text_input": "Hi",
        "max_tokens": 8,
        "top_k": 1,
        "return_log_probs": True,
    }
    body = triton.generate_body("ids", "", [5, 6, 7], 4)
    assert (
        body["input_ids"] == [5, 6, 7]
        and body["input_lengths"] == [3]
        and body["request_output_len"] == [4]
    )


def test_triton_responses_parse_to_greedy_ids(tokenizer):
    expected = tokenizer(" Paris. It is the largest city", add_special_tokens=False)["input_ids"]
    got = triton.parse_generate(
        "text", DATA["ensemble_response"], "The capital of France is", 5, tokenizer, 64
    )
    assert got == expected
    # some backend versions echo the prompt in text_output: it is stripped, not scored
    got = triton.parse_generate(
        "text", DATA["ensemble_response_with_prompt"], "The capital of France is", 5, tokenizer, 64
    )
    assert got == expected
    # output_ids [batch][beam][tokens] hold the prompt (3 ids) then 5 new ones, then padding
    ids = triton.parse_generate("ids", DATA["trtllm_response"], "", 3, None, 5)
    assert ids == [4649, 314, 7042, 30, 657]


def test_sampled_requests_carry_the_setting_under_the_servers_names():
    from builder.triton.tensors import TENSORRT_LLM_INPUTS, TEXT_INPUTS
    from builder.verify.runtimes.base import until_eos
    from builder.verify.sampling import Sampling

    on = Sampling.card(True, 16, seed=9)
    text = triton.generate_body("text", "Hi", [1, 2], 16, on)
    ids = triton.generate_body("ids", "", [1, 2], 16, on, eos_id=4)
    assert (text["temperature"], text["top_p"], text["seed"], text["top_k"]) == (0.6, 0.95, 9, 0)
    assert ids["temperature"] == [0.6] and ids["runtime_top_p"] == [0.95]
    assert ids["seed"] == [9] and ids["runtime_top_k"] == [0] and ids["end_id"] == [4]
    # every field is an input of the models this tool's Triton repositories declare
    assert set(text) <= {t.name for t in TEXT_INPUTS}
    assert set(ids) <= {t.name for t in TENSORRT_LLM_INPUTS}
    assert triton.generate_body("ids", "", [1], 3, Sampling.greedy(3))["runtime_top_k"] == [1]
    body = openai.completion_body([1, 2], on, ids=True, ignore_eos=False)
    assert body == {
        "prompt": [1, 2],
        "max_tokens": 16,
        "temperature": 0.6,
        "top_p": 0.95,
        "seed": 9,
        "logprobs": 1,
        "return_tokens_as_token_ids": True,
    }
    greedy = openai.completion_body([1], Sampling.greedy(4), ids=False, ignore_eos=True)
    assert greedy == {"prompt": [1], "max_tokens": 4, "temperature": 0.0, "ignore_eos": True}
    assert until_eos([5, 4, 6], 8, 4) == [5, 4] and until_eos([5, 4, 6], 2, None) == [5, 4]


def test_openai_prompt_logprobs_and_echo_shapes():
    ids = [5, 9, 3]
    entries = [
        None,
        {"9": {"logprob": -0.5, "rank": 1}, "4": {"logprob": -1.5, "rank": 2}},
        {"7": {"logprob": -0.1, "rank": 1}, "3": {"logprob": -4.0, "rank": 5}},
    ]
    s = openai.scores_from_prompt_logprobs(entries, ids, k=2)
    assert s.top_ids.tolist() == [[9, 4], [7, 3]] and s.target_logprobs.tolist() == [-0.5, -4.0]
    echo = {
        "tokens": ["token_id:5", "token_id:9", "token_id:3", "token_id:8"],
        "token_logprobs": [None, -0.5, -4.0, -0.2],
        "top_logprobs": [
            None,
            {"token_id:9": -0.5},
            {"token_id:7": -0.1, "token_id:3": -4.0},
            {"token_id:8": -0.2},
        ],
    }
    e = openai.scores_from_echo(echo, ids, k=2)
    assert e.top_ids.tolist() == [[9, -1], [7, 3]] and math.isnan(float(e.top_logprobs[0, 1]))
    assert torch.equal(e.target_logprobs, s.target_logprobs)
    assert openai.parse_token("token_id:42") == 42 and openai.parse_token("Paris") is None


def test_trtllm_runtime_without_tensorrt_llm_is_a_clear_error(smollm2_golden, tmp_path):
    try:
        import tensorrt_llm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorrt_llm is installed here")
    args = [
        "verify",
        str(tmp_path),
        "--golden",
        str(smollm2_golden),
        "--runtime",
        "trtllm",
        "--report",
        str(tmp_path / "r"),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert (
        result.output.startswith("error: the trtllm runtime needs TensorRT-LLM")
        and "Traceback" not in result.output
    )
    assert not (tmp_path / "r").exists()  # nothing that looks like a result
