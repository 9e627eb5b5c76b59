"""The regression gate: medians over repeats, a threshold, and the measured spread."""

from __future__ import annotations

import pytest

from builder.cli import main
from builder.report.compare import compare, compare_precision, parse_threshold
from builder.report.records import write_record


def verdicts(result) -> dict[str, str]:
    return {r.metric: r.verdict(result.max_regression) for r in result.rows}


def test_a_10_percent_slowdown_is_a_regression(records):
    bench, _ = records
    result = compare([bench()], [bench(slowdown=0.10)], 0.05)
    v = verdicts(result)
    assert v["output_token_throughput"] == "REGRESSION" and v["tpot_p50"] == "REGRESSION"
    assert result.regressions


def test_a_2_percent_slowdown_passes(records):
    bench, _ = records
    result = compare([bench()], [bench(slowdown=0.02)], 0.05)
    assert not result.regressions and set(verdicts(result).values()) == {"ok"}


def test_a_change_within_the_measured_spread_is_noise(records):
    """10% slower medians, but the repeats scatter by +-15%: not a regression."""
    bench, _ = records
    result = compare([bench(jitter=0.15)], [bench(slowdown=0.10, jitter=0.15)], 0.05)
    assert not result.regressions
    assert verdicts(result)["output_token_throughput"] == "noise"


def test_improvements_and_unmatched_workloads(records):
    bench, _ = records
    result = compare([bench(), bench(concurrency=8)], [bench(slowdown=-0.2)], 0.05)
    assert verdicts(result)["output_token_throughput"] == "improved"
    assert any("concurrency=8 only in the base" in note for note in result.unmatched)


def test_two_artifacts_in_one_directory_are_each_gated(records):
    """A run that benches a BF16 and an FP8 artifact on the same workload (bench_gpu does) is
    compared kind by kind: a regression of either one is caught, and new builds (other
    sha256s) of the same kinds still match."""
    bench, _ = records
    base = [bench("trtllm-bf16", "a" * 64), bench("trtllm-fp8", "b" * 64)]
    current = [bench("trtllm-bf16", "c" * 64), bench("trtllm-fp8", "d" * 64, slowdown=0.10)]
    result = compare(base, current, 0.05)
    by_kind = {(r.workload.split(" · ")[0], r.metric): r for r in result.rows}
    assert by_kind["trtllm-bf16", "output_token_throughput"].verdict(0.05) == "ok"
    assert by_kind["trtllm-fp8", "output_token_throughput"].verdict(0.05) == "REGRESSION"
    assert not result.unmatched and not result.warnings


def test_two_artifacts_under_one_key_are_said(records):
    bench, _ = records
    side = [bench("trtllm-fp8", "a" * 64), bench("trtllm-fp8", "b" * 64, created="2026-12-02")]
    result = compare(side, [bench("trtllm-fp8", "c" * 64)], 0.05)
    assert any("two artifacts" in w and "only the newest" in w for w in result.warnings)


def test_threshold_parsing():
    assert parse_threshold("5%") == pytest.approx(0.05) and parse_threshold("0.2") == pytest.approx(
        0.2
    )
    with pytest.raises(Exception, match="percentage"):
        parse_threshold("fast")


def test_cli_exits_1_on_an_injected_slowdown(tmp_path, records, capsys):
    bench, _ = records
    base, slow, fine = tmp_path / "base", tmp_path / "slow", tmp_path / "fine"
    for c in (1, 4):
        write_record(base, bench(concurrency=c))
        write_record(slow, bench(concurrency=c, slowdown=0.10))
        write_record(fine, bench(concurrency=c, slowdown=0.02))
    with pytest.raises(SystemExit) as fail:
        main(
            ["report", "compare", str(base), str(slow), "--max-regression", "5%"],
            standalone_mode=False,
        )
    assert fail.value.code == 1
    assert "REGRESSION" in capsys.readouterr().out
    assert (
        main(
            ["report", "compare", str(base), str(fine), "--max-regression", "5%"],
            standalone_mode=False,
        )
        is None
    )


def test_fp8_beside_bf16_with_accuracy(records):
    bench, verify = records
    bf16 = [bench("trtllm-bf16", "a" * 64, c) for c in (1, 64)]
    fp8 = [
        bench("trtllm-fp8", "b" * 64, 1, slowdown=-0.8 / 1.8),
        bench("trtllm-fp8", "b" * 64, 64, slowdown=-0.4 / 1.4),
    ]
    table = compare_precision(
        bf16, fp8, [verify("trtllm-fp8", "b" * 64, 0.012), verify("trtllm-bf16", "a" * 64, 0.0)]
    )
    speedups = {
        r.workload: table.speedup(r) for r in table.rows if r.metric == "output_token_throughput"
    }
    assert speedups["isl=128,osl=128,concurrency=1"] == pytest.approx(1.8)
    assert speedups["isl=128,osl=128,concurrency=64"] == pytest.approx(1.4)
    assert table.headline() == (
        "trtllm-fp8 vs trtllm-bf16 output tokens/s: 1.80x at concurrency 1, 1.40x at concurrency 64"
    )
    text = table.markdown()
    assert "kl_mean" in text and "0.012" in text and len(table.accuracy) == 2
