"""How a continuation picks its tokens: one typed setting and one pure function.

`Sampling(temperature, top_p, seed, max_tokens)`; temperature 0 is greedy. `pick_token(logits,
sampling, generator)` is the only place a token is chosen from logits: the golden (builder.
verify.golden), the stream's continuations (builder.verify.stream) and the executor and hf
runtimes all call it, so an artifact run with the golden's seed draws from the same random
numbers as the golden (common random numbers: identical distributions give identical tokens,
and a sampled score differs only where the artifact's distribution moved). Server runtimes pass
temperature / top_p / seed to the server, whose own sampler draws.

Rules of `pick_token`:
  greedy   argmax of the logits (torch.argmax: the lowest id among equal maxima); the
           generator is not touched;
  sampled  float64 softmax of logits / temperature on the CPU; ids ordered by probability,
           descending, equal probabilities by id ascending (a stable sort); the nucleus is the
           shortest prefix of that order whose mass reaches top_p (a token is kept when the
           mass before it is < top_p, so the most likely token always is); one uniform u in
           [0, 1) from the generator, and the token is the first of the nucleus whose
           cumulative mass exceeds u x (nucleus mass), i.e. inverse-CDF sampling of the
           renormalized nucleus. Exactly one draw per token: a sequence's tokens depend only on
           its seed and its own logits, not on the other sequences of a batch or their length.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from builder.errors import UserError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    max_tokens: int = 64

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserError(f"sampling: temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"sampling: top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 0 or self.seed < 0:
            raise UserError(
                f"sampling: max_tokens and seed must be >= 0, got {self.max_tokens}, {self.seed}"
            )

    @classmethod
    def greedy(cls, max_tokens: int) -> Sampling:
        return cls(max_tokens=max_tokens)

    @classmethod
    def card(cls, reasoning: bool, max_tokens: int, seed: int = 0) -> Sampling:
        """The model card's settings (builder.chat): reasoning on sampled, off greedy."""
        from builder import chat

        card = chat.sampling(reasoning)
        if not card.do_sample:
            return cls.greedy(max_tokens)
        return cls(card.temperature, card.top_p, seed, max_tokens)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    def reseeded(self, seed: int) -> Sampling:
        return replace(self, seed=seed)

    def generator(self) -> torch.Generator | None:
        """A CPU generator seeded with `seed` (None when greedy: nothing is drawn)."""
        if self.is_greedy:
            return None
        return torch.Generator(device="cpu").manual_seed(self.seed)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def pick_token(
    logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None
) -> int:
    """The next token from logits [V] under `sampling` (rules in the module docstring)."""
    if sampling.is_greedy:
        return int(logits.argmax())
    if generator is None:
        raise ValueError("sampled decoding needs a generator (Sampling.generator())")
    probs = torch.softmax(logits.detach().to("cpu", torch.float64) / sampling.temperature, dim=-1)
    probs, order = torch.sort(probs, descending=True, stable=True)
    before = torch.cumsum(probs, dim=0) - probs
    nucleus = probs[before < sampling.top_p]
    cumulative = torch.cumsum(nucleus, dim=0)
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    index = int(torch.searchsorted(cumulative, u * float(cumulative[-1]), right=True))
    return int(order[min(index, len(nucleus) - 1)])


class Sampler:
    """One sequence's token picker: its setting and its own generator (seeded once)."""

    def __init__(self, sampling: Sampling):
        self.sampling = sampling
        self.generator = sampling.generator()

    def __call__(self, logits: torch.Tensor) -> int:
        return pick_token(logits, self.sampling, self.generator)
