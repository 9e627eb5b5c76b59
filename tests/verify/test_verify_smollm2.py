"""FP8 SmolLM2 against its BF16 golden on the executor (TensorRT-LLM checkpoint) and hf (unified
HF export) runtimes: both pass the default thresholds, and they agree with each other."""

from __future__ import annotations

import math

import pytest
import torch

from builder.report.records import RecordKind, Verdict, read_record
from builder.verify.run import VerifyOptions, verify
from builder.verify.runtimes import RuntimeArgs, make_runtime


@pytest.fixture(scope="module")
def results(smollm2_golden, smollm2_fp8, tmp_path_factory):
    out = {}
    for name, artifact in (("executor", smollm2_fp8 / "trtllm"), ("hf", smollm2_fp8 / "hf")):
        runtime = make_runtime(name, RuntimeArgs(artifact=str(artifact), dtype=torch.float32))
        report = tmp_path_factory.mktemp(f"report-{name}")
        result = verify(smollm2_golden, runtime, VerifyOptions(report=report))
        out[name] = (result, result.comparison)
    return out


@pytest.mark.parametrize("name", ["executor", "hf"])
def test_fp8_smollm2_passes_the_default_thresholds(results, name, capsys):
    result, _ = results[name]
    with capsys.disabled():
        print(f"\n{result.table}")
    assert result.exit_code == 0, result.failures
    m = result.metrics
    assert 0 < m["kl_mean"] and m["top1_agreement"] < 1  # FP8 changed something: the check is live
    assert set(m) >= {
        "kl_mean",
        "kl_p99",
        "top1_agreement",
        "greedy_exact_match",
        "greedy_prefix_mean",
        "ppl_ratio",
    }
    record = read_record(result.record_path)  # the shared run-record schema, read back
    assert (
        record.kind is RecordKind.VERIFY
        and record.verdict is Verdict.PASS
        and record.runtime == name
    )
    assert record.artifact.kind == ("trtllm-fp8" if name == "executor" else "hf-fp8")
    assert len(record.artifact.sha256) == 64 and record.metrics["kl_mean"].better == "lower"
    assert result.record_path.with_suffix(".md").read_text().startswith("### verify")


def test_executor_and_hf_agree_within_their_sampling_error(results):
    """Both are FP8 of one calibration on different grids (TensorRT-LLM shares the q/k/v and
    gate/up scales and floors the KV scale at 1; the HF export keeps per-module scales), so
    they may differ by quantization noise but not systematically. Tolerance, per metric, from
    the positions scored (n): top-1 agreement within 3 binomial standard errors of a
    difference, sqrt(2 p (1 - p) / n); mean NLL (log perplexity) within 3 standard errors of
    the difference of two means; mean KL within a factor 2 (the KL of each is dominated by
    the same few uncertain positions, so its spread is multiplicative, not additive)."""
    (ex, ex_cmp), (hf, hf_cmp) = results["executor"], results["hf"]
    n = sum(len(a) for a in ex_cmp.agree)
    p = (ex.metrics["top1_agreement"] + hf.metrics["top1_agreement"]) / 2
    assert abs(ex.metrics["top1_agreement"] - hf.metrics["top1_agreement"]) <= 3 * math.sqrt(
        2 * p * (1 - p) / n
    )
    nll_ex = -torch.cat(ex_cmp.artifact_targets).double()
    nll_hf = -torch.cat(hf_cmp.artifact_targets).double()
    se = math.sqrt(float(nll_ex.var() + nll_hf.var()) / n)
    assert abs(float(nll_ex.mean() - nll_hf.mean())) <= 3 * se
    ratio = ex.metrics["kl_mean"] / hf.metrics["kl_mean"]
    assert 0.5 <= ratio <= 2.0
