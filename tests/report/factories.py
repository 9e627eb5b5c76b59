"""Hand-made run records for the history, compare and report tests."""

from __future__ import annotations

from builder.bench.metrics import definition_of
from builder.report.records import Artifact, Metric, RecordKind, RunRecord

BASE_THROUGHPUT = 100.0  # tok/s
BASE_TPOT = 20.0  # ms


def metric(key: str, repeats: list[float]) -> Metric:
    d = definition_of(key)
    return Metric.from_repeats(repeats, d.unit, d.definition, d.better)


def bench_record(
    kind: str = "trtllm-bf16",
    sha: str = "a" * 64,
    concurrency: int = 1,
    slowdown: float = 0.0,
    jitter: float = 0.005,
    created: str = "2026-12-01T10:00:00Z",
    runtime: str = "executor",
) -> RunRecord:
    """Three repeats around a throughput and a latency; `slowdown` 0.1 = 10% slower,
    `jitter` the relative spread of the repeats around their median."""
    tput = BASE_THROUGHPUT * concurrency / (1 + slowdown)
    tpot = BASE_TPOT * (1 + slowdown)
    spread = [1.0, 1.0 - jitter, 1.0 + jitter]
    metrics = {
        "output_token_throughput": metric("output_token_throughput", [tput * f for f in spread]),
        "request_throughput": metric("request_throughput", [tput / 128 * f for f in spread]),
        "tpot_p50": metric("tpot_p50", [tpot * f for f in spread]),
        "ttft_p50": metric("ttft_p50", [5 * tpot * f for f in spread]),
        "ttft_p90": metric("ttft_p90", [6 * tpot * f for f in spread]),
        "ttft_p99": metric("ttft_p99", [7 * tpot * f for f in spread]),
        "itl_p50": metric("itl_p50", [tpot * f for f in spread]),
        "itl_p90": metric("itl_p90", [1.2 * tpot * f for f in spread]),
        "itl_p99": metric("itl_p99", [1.5 * tpot * f for f in spread]),
    }
    return RunRecord(
        kind=RecordKind.BENCH,
        model="smollm2",
        artifact=Artifact(f"/art/{kind}", kind, sha),
        runtime=runtime,
        device="test cpu",
        created=created,
        settings={
            "isl": 128,
            "osl": 128,
            "concurrency": concurrency,
            "workload": f"isl=128,osl=128,concurrency={concurrency}",
        },
        metrics=metrics,
    )


def verify_record(kind: str, sha: str, kl: float) -> RunRecord:
    return RunRecord(
        kind=RecordKind.VERIFY,
        model="smollm2",
        artifact=Artifact(f"/art/{kind}", kind, sha),
        runtime="executor",
        device="test cpu",
        created="2026-12-01T11:00:00Z",
        metrics={
            "kl_mean": Metric(kl, "nats", "mean KL", "lower"),
            "top1": Metric(1 - 10 * kl, "fraction", "top-1 agreement", "higher"),
        },
        details={
            "kl_per_position": [kl * (1 + (i % 5) / 5) for i in range(32)],
            "kl_per_block": [kl / 30 * (1 + i % 3) for i in range(30)],
        },
    )
