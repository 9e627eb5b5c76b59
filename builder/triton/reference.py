"""Greedy generation with builder's checkpoint executor: what the CPU stand-in for the
tensorrt_llm model runs (pymodels/executor.py), and what tests compare the server against.

Prefill once, then one decode step per token through the executor's KV cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from builder.runtime import TrtllmCheckpointExecutor


@dataclass(frozen=True)
class Generated:
    tokens: list[int]  # new tokens, the end id included when it was produced
    log_probs: list[float]  # log-softmax of each chosen token

    @property
    def cum_log_prob(self) -> float:
        return float(sum(self.log_probs))


@torch.no_grad()
def greedy_generate(
    executor: TrtllmCheckpointExecutor,
    prompt: Sequence[int],
    max_new_tokens: int,
    end_id: int | None = None,
    on_token: Callable[[int, float], None] | None = None,
) -> Generated:
    """Argmax decoding of up to `max_new_tokens` tokens after `prompt`, stopping at `end_id`,
    through the executor's KV cache; `on_token` is called as soon as each token is known, so
    a decoupled model streams it before the next step runs."""
    cache = executor.new_cache(1, len(prompt) + max_new_tokens, [0])
    tokens: list[int] = []
    log_probs: list[float] = []
    logits = executor.prefill(torch.tensor([list(prompt)], dtype=torch.long), cache)[0]
    for step in range(max_new_tokens):
        token = int(logits.argmax())
        log_prob = float(torch.log_softmax(logits.float(), dim=-1)[token])
        tokens.append(token)
        log_probs.append(log_prob)
        if on_token is not None:
            on_token(token, log_prob)
        if (end_id is not None and token == end_id) or step == max_new_tokens - 1:
            break
        logits = executor.decode_step(torch.tensor([token]), cache)[0]
    return Generated(tokens, log_probs)
