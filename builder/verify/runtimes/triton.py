"""`triton`: Triton Inference Server's generate endpoint, `/v2/models/<model>/generate`.

Triton's OpenAI frontend returns log-probs only for its vLLM backend, so a Triton +
TensorRT-LLM deployment is checked here (shared/reference/benchmarks.md §6). Two interfaces,
told apart by the model's metadata (`GET /v2/models/<model>`):
  text  the `ensemble` of the repositories this tool writes: inputs `text_input`,
        `max_tokens`, `top_k`, `return_log_probs`; outputs `text_output` (which some backend
        versions prefix with the prompt), `output_log_probs`, `cum_log_probs`. Continuations are
        tokenized with the golden's tokenizer;
  ids   a `tensorrt_llm` model: inputs `input_ids`, `input_lengths`, `request_output_len`,
        `return_log_probs`; outputs `output_ids`, `sequence_length`, `output_log_probs`.
Greedy is top_k = 1; sampled continuations send `temperature`, `top_p` and `seed` (text) or
`temperature`, `runtime_top_p` and `seed` (ids), with top_k 0 (TensorRT-LLM: no top-k limit),
the names of builder.triton.tensors. The endpoint gives no prompt log-probs: greedy metrics only.
Request building and response parsing are pure functions (tested on recorded responses).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from builder.errors import UserError
from builder.verify.runtimes.base import ArtifactInfo, Capabilities, until_eos
from builder.verify.runtimes.http import ServerError, request_json
from builder.verify.sampling import Sampling

TEXT_INPUT, IDS_INPUT = "text_input", "input_ids"


def interface_of(metadata: dict[str, Any]) -> str:
    names = {i.get("name") for i in metadata.get("inputs", [])}
    if TEXT_INPUT in names:
        return "text"
    if IDS_INPUT in names:
        return "ids"
    raise UserError(
        f"model {metadata.get('name')!r} has neither {TEXT_INPUT} nor {IDS_INPUT} inputs "
        f"(has {', '.join(sorted(n for n in names if n))})"
    )


def generate_body(
    interface: str,
    prompt_text: str,
    prompt_ids: list[int],
    n: int,
    sampling: Sampling | None = None,
    eos_id: int | None = None,
) -> dict[str, Any]:
    """A generate request: greedy (top_k 1) unless `sampling` samples; `eos_id` (ids
    interface) is sent as end_id, so the backend stops there."""
    sampled = sampling is not None and not sampling.is_greedy
    if interface == "text":
        body = {TEXT_INPUT: prompt_text, "max_tokens": n, "top_k": 1, "return_log_probs": True}
        if sampled:
            body |= {
                "top_k": 0,
                "top_p": sampling.top_p,
                "temperature": sampling.temperature,
                "seed": sampling.seed,
            }
        return body
    # The generate extension adds the batch dimension itself: one request's values, unbatched.
    body = {
        IDS_INPUT: list(prompt_ids),
        "input_lengths": [len(prompt_ids)],
        "request_output_len": [n],
        "runtime_top_k": [1],
        "return_log_probs": [True],
    }
    if sampled:
        body |= {
            "runtime_top_k": [0],
            "runtime_top_p": [sampling.top_p],
            "temperature": [sampling.temperature],
            "seed": [sampling.seed],
        }
    if eos_id is not None:
        body["end_id"] = [eos_id]
    return body


def parse_generate(
    interface: str,
    answer: dict[str, Any],
    prompt_text: str,
    prompt_len: int,
    tokenizer: Any,
    n: int,
) -> list[int]:
    """Greedy token ids out of a generate response."""
    if interface == "text":
        if "text_output" not in answer:
            raise ServerError(f"generate response has no text_output (fields: {', '.join(answer)})")
        text = answer["text_output"]
        text = text[0] if isinstance(text, list) else text
        text = text.removeprefix(
            prompt_text
        )  # backends that do not exclude the input from the output
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])[:n]
    ids = answer.get("output_ids")
    if ids is None:
        raise ServerError(f"generate response has no output_ids (fields: {', '.join(answer)})")
    while isinstance(ids, list) and ids and isinstance(ids[0], list):
        ids = ids[0]  # [batch][beam][tokens] -> tokens
    ids = [int(t) for t in ids]
    length = answer.get("sequence_length")
    while isinstance(length, list):
        length = length[0] if length else None
    if length is not None:
        ids = ids[: int(length)]
    if len(ids) >= prompt_len + 1 and len(ids) > n:
        ids = ids[prompt_len:]  # output_ids carry the prompt first
    return ids[:n]


class TritonRuntime:
    name = "triton"

    def __init__(
        self,
        url: str,
        model: str | None = None,
        top_k: int = 20,
        tokenizer: Any = None,
        timeout: float = 300.0,
    ):
        self.base = url.rstrip("/")
        self.model = model or "ensemble"
        self.tokenizer, self.timeout = tokenizer, timeout
        metadata = request_json(f"{self.base}/v2/models/{self.model}", timeout=timeout)
        self.interface = interface_of(metadata)
        if self.interface == "text" and tokenizer is None:
            raise UserError("the triton runtime's text interface needs the golden's tokenizer")
        self.device = f"server {self.base}"
        digest = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()
        self.artifact = ArtifactInfo(
            f"{self.base}/v2/models/{self.model}", "server", digest, {"interface": self.interface}
        )
        self.capabilities = Capabilities(
            prompt_scores=False,
            full_distribution=False,
            greedy=True,
            localize=False,
            top_k=top_k,
            notes=(
                f"Triton generate endpoint, model {self.model} ({self.interface} interface), "
                "greedy = top_k 1",
                "no prompt log-probs on this endpoint: KL, top-1 and perplexity are not measured",
            ),
        )

    def score(self, ids: torch.Tensor, golden_top_ids: torch.Tensor | None = None):
        raise UserError("the Triton generate endpoint returns no prompt log-probs")

    def generate(
        self, prompt_ids: torch.Tensor, sampling: Sampling, eos_id: int | None = None
    ) -> list[int]:
        n = sampling.max_tokens
        if n == 0:
            return []
        ids = [int(t) for t in prompt_ids]
        text = self.tokenizer.decode(ids) if self.tokenizer is not None else ""
        body = generate_body(self.interface, text, ids, n, sampling, eos_id)
        answer = request_json(f"{self.base}/v2/models/{self.model}/generate", body, self.timeout)
        tokens = parse_generate(self.interface, answer, text, len(ids), self.tokenizer, n)
        return until_eos(tokens, n, eos_id)

    def close(self) -> None:
        pass
