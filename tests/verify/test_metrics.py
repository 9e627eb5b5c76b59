"""builder.verify.metrics: the KL bucket, agreement, greedy prefixes, perplexity, percentiles."""

from __future__ import annotations

import math

import pytest
import torch

from builder.verify import metrics


def _logprobs(seed: int, positions: int = 6, vocab: int = 50) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(
        torch.randn(positions, vocab, generator=g, dtype=torch.float64) * 2, -1
    )


def test_bucket_kl_is_full_kl_when_the_top_k_is_the_whole_vocabulary():
    p, q = _logprobs(0), _logprobs(1)
    ids = torch.arange(50).expand(6, 50)
    full = (p.exp() * (p - q)).sum(-1)
    assert torch.allclose(metrics.bucket_kl(p, metrics.gather(q, ids)), full, atol=1e-12)


def test_bucket_kl_is_the_kl_of_top_k_plus_one_other_bucket_and_never_exceeds_full_kl():
    p, q = _logprobs(2), _logprobs(3)
    top_ids, top_p = metrics.top_k(p, 5)
    got = metrics.bucket_kl(top_p, metrics.gather(q, top_ids))
    for t in range(6):  # the coarse distributions written out by hand
        ps, qs = p[t, top_ids[t]].exp(), q[t, top_ids[t]].exp()
        pc = torch.cat([ps, (1 - ps.sum())[None]])
        qc = torch.cat([qs, (1 - qs.sum())[None]])
        assert float(got[t]) == pytest.approx(float((pc * (pc / qc).log()).sum()), rel=1e-9)
    assert bool((got <= (p.exp() * (p - q)).sum(-1) + 1e-12).all())  # data-processing inequality


def test_ids_the_artifact_does_not_cover_join_the_other_bucket():
    golden_lp = torch.log(torch.tensor([[0.5, 0.3, 0.1]], dtype=torch.float64))
    golden_ids = torch.tensor([[7, 8, 9]])
    # the server answered only ids 7 and 3: 8 and 9 are unknown, so both sides lump them
    art = metrics.align(
        golden_ids,
        torch.tensor([[7, 3]]),
        torch.log(torch.tensor([[0.4, 0.2]], dtype=torch.float64)),
    )
    assert torch.isnan(art[0, 1:]).all() and float(art[0, 0].exp()) == pytest.approx(0.4)
    expected = 0.5 * math.log(0.5 / 0.4) + 0.5 * math.log(0.5 / 0.6)
    assert float(metrics.bucket_kl(golden_lp, art)[0]) == pytest.approx(expected, rel=1e-12)


def test_zero_probability_scores_large_but_finite():
    golden_lp = torch.log(torch.tensor([[0.9, 0.05]], dtype=torch.float64))
    art = torch.tensor([[float("-inf"), math.log(0.5)]], dtype=torch.float64)
    kl = float(metrics.bucket_kl(golden_lp, art)[0])
    assert math.isfinite(kl) and kl > 10


def test_identical_distributions_score_zero_and_agree():
    p = _logprobs(4)
    ids, lp = metrics.top_k(p, 20)
    score = metrics.SequenceScore(ids, lp, p[:, 0])
    kl, agree = metrics.compare_scores(score, score)
    assert float(kl.abs().max()) < 1e-12 and bool(agree.all())


def test_comparison_summary():
    cmp = metrics.Comparison(
        kl=[torch.tensor([0.0, 0.1]), torch.tensor([0.2, 0.3])],
        agree=[torch.tensor([True, False]), torch.tensor([True, True])],
        golden_targets=[torch.tensor([-1.0, -1.0])],
        artifact_targets=[torch.tensor([-1.5, -0.5])],
        prefix=[4, 1],
        continuation=4,
    )
    s = cmp.summary()
    assert s["kl_mean"] == pytest.approx(0.15) and s["kl_p99"] == pytest.approx(0.3)
    assert s["top1_agreement"] == 0.75 and s["greedy_exact_match"] == 0.5
    assert s["greedy_prefix_mean"] == 2.5 and s["greedy_prefix_fraction"] == 0.625
    assert s["ppl_ratio"] == pytest.approx(1.0)  # mean NLL 1.0 on both sides


def test_prefix_percentile_perplexity():
    assert metrics.matching_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert metrics.matching_prefix([1, 2], [1, 2, 3]) == 2
    assert metrics.percentile(torch.arange(100.0), 0.99) == 99.0  # nearest rank, no interpolation
    assert metrics.percentile(torch.arange(10.0), 0.5) == 5.0
    assert metrics.perplexity([torch.tensor([math.log(0.5)] * 3)]) == pytest.approx(2.0)
