"""Metric definitions on hand-made timelines with known answers."""

from __future__ import annotations

import math

import pytest

from builder.bench.metrics import (
    DISTRIBUTIONS,
    SYSTEM,
    RequestTimeline,
    definition_of,
    run_metrics,
    summarize,
    to_metrics,
)

# A: sent at 0, four tokens 100 ms apart. B: sent at 50 ms, three tokens, uneven gaps.
A = RequestTimeline(start=0.0, chunk_times=(0.1, 0.2, 0.3, 0.4), input_tokens=10, output_tokens=4)
B = RequestTimeline(start=0.05, chunk_times=(0.25, 0.30, 0.65), input_tokens=10, output_tokens=3)


def test_per_request_quantities():
    assert A.ttft == pytest.approx(0.1) and B.ttft == pytest.approx(0.2)
    assert A.e2e == pytest.approx(0.4) and B.e2e == pytest.approx(0.6)
    assert A.tpot == pytest.approx(0.1)  # (0.4 - 0.1) / (4 - 1)
    assert B.tpot == pytest.approx(0.2)  # (0.65 - 0.25) / (3 - 1)
    assert B.gaps == pytest.approx([0.05, 0.35])


def test_system_metrics():
    m = run_metrics([A, B])
    duration = 0.65  # last token of B - first start (A)
    assert m["request_throughput"] == pytest.approx(2 / duration)
    assert m["output_token_throughput"] == pytest.approx(7 / duration)
    assert m["total_token_throughput"] == pytest.approx(27 / duration)
    assert m["output_token_throughput_per_user"] == pytest.approx((4 / 0.4 + 3 / 0.6) / 2)  # 7.5
    assert m["decode_speed_per_user"] == pytest.approx((1 / 0.1 + 1 / 0.2) / 2)  # 7.5


def test_ttft_and_tpot_distributions_over_requests():
    m = run_metrics([A, B])
    # ttft [100, 200] ms: linear percentiles 100 + q (200 - 100)
    assert m["ttft_mean"] == pytest.approx(150) and m["ttft_std"] == pytest.approx(50)
    assert (m["ttft_p50"], m["ttft_p90"], m["ttft_p99"]) == pytest.approx((150, 190, 199))
    assert (m["tpot_mean"], m["tpot_p90"]) == pytest.approx((150, 190))
    assert (m["e2e_latency_p50"], m["e2e_latency_p99"]) == pytest.approx((500, 598))


def test_itl_pools_the_gaps_of_all_requests():
    """vLLM's ITL (AIPerf: inter_chunk_latency): gaps [100, 100, 100, 50, 350] ms pooled,
    not the per-request TPOT (AIPerf: inter_token_latency)."""
    m = run_metrics([A, B])
    assert m["itl_mean"] == pytest.approx(140)
    assert m["itl_p50"] == pytest.approx(100)
    assert m["itl_p90"] == pytest.approx(250)  # sorted [50,100,100,100,350], rank 3.6
    assert m["itl_p99"] == pytest.approx(340)
    assert m["itl_std"] == pytest.approx(math.sqrt((90**2 + 3 * 40**2 + 210**2) / 5))
    assert m["itl_p90"] != m["tpot_p90"]


def test_percentiles_are_aiperfs_linear_interpolation():
    """AIPerf's metric_result_from_array: virtual index q/100 x (n - 1), linear between ranks."""
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    ordered = sorted(values)
    for q, stat in ((50, "p50"), (90, "p90"), (99, "p99")):
        index = q / 100 * (len(values) - 1)
        lo = int(index)
        hi = min(lo + 1, len(values) - 1)
        expected = ordered[lo] + (index - lo) * (ordered[hi] - ordered[lo])
        assert summarize(values)[stat] == pytest.approx(expected)


def test_one_token_requests_have_no_tpot():
    single = RequestTimeline(0.0, (0.2,), 5, 1)
    m = run_metrics([single])
    assert "tpot_mean" not in m and "itl_mean" not in m and "decode_speed_per_user" not in m
    assert m["ttft_p50"] == pytest.approx(200)


def test_bad_timelines_are_refused():
    with pytest.raises(ValueError):
        RequestTimeline(1.0, (0.5,), 1, 1)
    with pytest.raises(ValueError):
        RequestTimeline(0.0, (0.3, 0.2), 1, 2)


def test_repeats_become_medians_with_spread_and_definitions():
    runs = [run_metrics([A, B]), run_metrics([A]), run_metrics([B])]
    metrics = to_metrics(runs)
    ttft = metrics["ttft_p50"]
    assert ttft.value == pytest.approx(150) and ttft.repeats == pytest.approx((150, 100, 200))
    assert ttft.spread == pytest.approx(100) and ttft.unit == "ms" and ttft.better == "lower"
    assert "linear" in ttft.definition
    assert metrics["request_throughput"].better == "higher"


def test_every_metric_name_has_one_definition():
    for name in [
        *SYSTEM,
        *(f"{d}_{s}" for d in DISTRIBUTIONS for s in ("mean", "std", "p50", "p90", "p99")),
    ]:
        assert definition_of(name).definition
    assert "inter_token_latency" in definition_of("tpot_p50").definition  # the naming trap, said
    with pytest.raises(KeyError):
        definition_of("ttft_p42")
