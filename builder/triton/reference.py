"""Greedy generation with builder's checkpoint executor: what the CPU stand-in for the
tensorrt_llm model runs (pymodels/executor.py), and what tests compare the server against.

Each step runs `executor.forward` over the whole sequence (the executor has no KV cache yet),
so this is for small models only.
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


def greedy_generate(
    executor: TrtllmCheckpointExecutor,
    prompt: Sequence[int],
    max_new_tokens: int,
    end_id: int | None = None,
    on_token: Callable[[int, float], None] | None = None,
) -> Generated:
    """Argmax decoding of up to `max_new_tokens` tokens after `prompt`, stopping at `end_id`."""
    ids = list(prompt)
    tokens: list[int] = []
    log_probs: list[float] = []
    for _ in range(max_new_tokens):
        logits = executor.forward(torch.tensor(ids, dtype=torch.long))[-1]
        token = int(logits.argmax())
        log_prob = float(torch.log_softmax(logits.float(), dim=-1)[token])
        tokens.append(token)
        log_probs.append(log_prob)
        ids.append(token)
        if on_token is not None:
            on_token(token, log_prob)
        if end_id is not None and token == end_id:
            break
    return Generated(tokens, log_probs)
