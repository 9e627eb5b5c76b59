"""FP8 accuracy of the real SmolLM2-135M against thresholds kept in calib/thresholds.toml."""

from __future__ import annotations

import pytest
import torch

from builder.verify.fp8_accuracy import (
    AccuracyReport,
    AccuracyRow,
    evaluate_accuracy,
    format_table,
    load_thresholds,
    threshold_failures,
    threshold_setup,
)

SECTION = "smollm2-ci"


@pytest.mark.slow
def test_smollm2_fp8_accuracy_within_thresholds(smollm2_ckpt, smollm2_fp8, capsys):
    setup = threshold_setup(SECTION)  # smollm2_fp8 (tests/conftest.py) is calibrated with it
    report = evaluate_accuracy(
        smollm2_ckpt,
        smollm2_fp8,
        windows=setup["windows"],
        seq_len=setup["seq_len"],
        dtype=getattr(torch, setup["dtype"]),
        thresholds=SECTION,
    )
    with capsys.disabled():
        print(
            f"\n{format_table(report)}\n{(smollm2_fp8.parent / 'summary.txt').read_text().strip()}"
        )
    assert [row.variant for row in report.rows] == ["trtllm", "fake-quant"]
    assert report.passed, report.failures
    for row in report.rows:
        assert 0 < row.kl and row.top1 < 1  # FP8 changed something: the comparison is live
    # A trained model, not noise: a model that knows nothing scores the vocabulary size
    # (49152); SmolLM2-135M's published held-out Wikipedia perplexity is in the tens at most,
    # and below 5 would mean the held-out text leaked into what it was trained or tested on.
    assert 5 < report.reference_perplexity < 40


def test_threshold_checks_name_the_metric():
    report = AccuracyReport(
        "m", "q", 1, 8, 8, "bfloat16", 10.0, rows=[AccuracyRow("trtllm", 0.2, 0.5, 12.0, 1.2)]
    )
    failures = threshold_failures(report, {"kl_max": 0.1, "top1_min": 0.9, "ppl_ratio_max": 1.1})
    assert failures == [
        "trtllm: mean KL 0.2000 breaks kl_max = 0.1",
        "trtllm: top-1 agreement 0.5000 breaks top1_min = 0.9",
        "trtllm: perplexity ratio 1.2000 breaks ppl_ratio_max = 1.1",
    ]
    assert set(load_thresholds("smollm2")) == {"kl_max", "top1_min", "ppl_ratio_max"}
    assert "BF16 || FP8" in format_table(report)
