"""The one token picker (builder.verify.sampling): greedy, nucleus, seeds, distribution."""

from __future__ import annotations

import math

import pytest
import torch

from builder.errors import UserError
from builder.verify.sampling import Sampler, Sampling, pick_token


def test_temperature_zero_is_the_argmax_and_draws_nothing():
    torch.manual_seed(0)
    greedy = Sampling.greedy(8)
    for _ in range(50):
        logits = torch.randn(97)
        assert pick_token(logits, greedy) == int(logits.argmax())
    # ties: the lowest id, as torch.argmax documents
    assert pick_token(torch.tensor([1.0, 3.0, 3.0, 0.0]), greedy) == 1
    assert greedy.generator() is None and greedy.is_greedy


def test_a_tiny_top_p_keeps_only_the_most_likely_token():
    torch.manual_seed(1)
    narrow = Sampling(temperature=0.6, top_p=1e-9, seed=3)
    generator = narrow.generator()
    for _ in range(50):
        logits = torch.randn(97)
        assert pick_token(logits, narrow, generator) == int(logits.argmax())
    # equal maxima: the stable order keeps the lowest id first, the argmax's choice
    assert pick_token(torch.tensor([0.0, 2.0, 2.0]), narrow, generator) == 1


def test_the_same_seed_draws_the_same_tokens():
    logits = torch.randn(50, 32, generator=torch.Generator().manual_seed(5))
    setting = Sampling(temperature=1.0, top_p=0.95, seed=11)

    def draws(s: Sampling) -> list[int]:
        sampler = Sampler(s)
        return [sampler(row) for row in logits]

    assert draws(setting) == draws(setting)
    assert draws(setting) != draws(setting.reseeded(12))  # 50 draws over ~20 likely ids


def test_draws_follow_the_tempered_nucleus():
    """p = (0.5, 0.3, 0.15, 0.05) at temperature 0.5 is p^2 normalized: (0.685, 0.247, 0.062,
    0.007); the mass before the last id is 0.993 >= top_p 0.95, so the nucleus is ids 0-2 and
    their probabilities renormalize to (0.25, 0.09, 0.0225) / 0.3625. Over N independent draws
    the share of id i is a binomial proportion; Hoeffding's inequality bounds
    P(|share - p_i| >= eps) <= 2 exp(-2 N eps^2), so eps = sqrt(ln(2 / delta) / (2 N)) fails a
    correct sampler with probability <= delta = 1e-6 per id (eps = 0.027 at N = 10,000). A
    wrong temperature (0.526 for id 0 at T = 1) or a nucleus that kept id 3 is far outside."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    setting = Sampling(temperature=0.5, top_p=0.95, seed=2026)
    sampler, n = Sampler(setting), 10_000
    counts = torch.bincount(torch.tensor([sampler(p.log()) for _ in range(n)]), minlength=4)
    expected = torch.tensor([0.25, 0.09, 0.0225, 0.0]) / 0.3625
    eps = math.sqrt(math.log(2 / 1e-6) / (2 * n))
    assert counts[3] == 0
    assert torch.all((counts / n - expected).abs() < eps), (counts / n, expected)


def test_the_card_settings_and_bad_values():
    on, off = Sampling.card(True, 100, seed=4), Sampling.card(False, 50)
    assert (on.temperature, on.top_p, on.seed, on.max_tokens) == (0.6, 0.95, 4, 100)
    assert off == Sampling.greedy(50) and off.is_greedy
    for bad in ({"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"max_tokens": -1}):
        with pytest.raises(UserError, match="sampling:"):
            Sampling(**bad)
    with pytest.raises(ValueError, match="needs a generator"):
        pick_token(torch.zeros(3), on)
