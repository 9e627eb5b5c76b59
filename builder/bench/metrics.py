"""Throughput and latency metrics: every definition, written once.

Per request i: t_start (sent), chunk times (each streamed chunk or generated token arriving;
the first one is the first output token), t_end (the last one), ISL_i, OSL_i (output tokens
including the first). Run duration T = max(t_end) - min(t_start).

The field uses the same words for different things; records use the names on the left:

| record name | definition | AIPerf / GenAI-Perf | vLLM bench | trtllm-bench |
|---|---|---|---|---|
| ttft | t_first - t_start | time_to_first_token | TTFT | ttft (streaming) |
| tpot | (t_end - t_first) / (OSL - 1), per request | inter_token_latency | TPOT | tpot |
| itl | gaps between consecutive chunks, pooled over all requests | inter_chunk_latency | ITL | - |
| e2e_latency | t_end - t_start | request_latency | E2EL | request latency |
| request_throughput | N / T | request_throughput | Request throughput | request_throughput_req_s |
| output_token_throughput | sum OSL / T | output_token_throughput | Output token throughput | system_output_throughput_tok_s |
| total_token_throughput | sum (ISL + OSL) / T | - | Total token throughput | system_total_throughput_tok_s |
| output_token_throughput_per_user | mean_i OSL_i / (t_end - t_start) (prefill included) | - | - | output_throughput_per_user_tok_s |
| decode_speed_per_user | mean_i 1 / tpot_i | output_token_throughput_per_user | - | token_output_speed_tok_s |

So AIPerf's "inter_token_latency" is our (and vLLM's) TPOT, and AIPerf's "inter_chunk_latency"
is vLLM's ITL; AIPerf's "output_token_throughput_per_user" is our decode_speed_per_user.
With one token per chunk, the mean of tpot and itl coincide; their percentiles do not.

Distributions are summarized as mean, std (population, ddof 0), p50, p90, p99 with
`PERCENTILE_METHOD`; record keys are `<metric>_<stat>` (e.g. `ttft_p99`), in milliseconds.
"""  # noqa: E501 (the Markdown table above does not wrap)

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from builder.report.records import Metric

PERCENTILE_METHOD = (
    "linear interpolation between closest ranks (numpy.percentile 'linear', as AIPerf and "
    "GenAI-Perf); trtllm-bench uses nearest rank sorted[int(n*q)], imported values keep theirs"
)
STATS = ("mean", "std", "p50", "p90", "p99")


@dataclass(frozen=True)
class MetricDef:
    name: str
    unit: str
    better: str  # "higher" | "lower" | "none"
    definition: str
    aiperf: str | None = None  # AIPerf profile_export_aiperf.json key
    trtllm_bench: str | None = None  # trtllm-bench report_json key (without unit suffix stats)


DISTRIBUTIONS: dict[str, MetricDef] = {
    d.name: d
    for d in (
        MetricDef(
            "ttft",
            "ms",
            "lower",
            "time to first token: t_first - t_start",
            "time_to_first_token",
            "ttft",
        ),
        MetricDef(
            "tpot",
            "ms",
            "lower",
            "time per output token after the first, per request: (t_end - t_first) / (OSL - 1) "
            "(AIPerf calls it inter_token_latency)",
            "inter_token_latency",
            "tpot",
        ),
        MetricDef(
            "itl",
            "ms",
            "lower",
            "inter-token latency: gaps between consecutive streamed chunks, pooled over all "
            "requests (vLLM's ITL; AIPerf calls it inter_chunk_latency)",
            "inter_chunk_latency",
            None,
        ),
        MetricDef(
            "e2e_latency",
            "ms",
            "lower",
            "end-to-end request latency: t_end - t_start",
            "request_latency",
            "request_latency",
        ),
    )
}

SYSTEM: dict[str, MetricDef] = {
    d.name: d
    for d in (
        MetricDef(
            "request_throughput",
            "req/s",
            "higher",
            "completed requests / run duration T",
            "request_throughput",
            "request_throughput_req_s",
        ),
        MetricDef(
            "output_token_throughput",
            "tok/s",
            "higher",
            "sum of OSL / T (whole system)",
            "output_token_throughput",
            "system_output_throughput_tok_s",
        ),
        MetricDef(
            "total_token_throughput",
            "tok/s",
            "higher",
            "sum of (ISL + OSL) / T",
            None,
            "system_total_throughput_tok_s",
        ),
        MetricDef(
            "output_token_throughput_per_user",
            "tok/s/user",
            "higher",
            "mean over requests of OSL_i / (t_end - t_start), prefill included",
            None,
            "output_throughput_per_user_tok_s",
        ),
        MetricDef(
            "decode_speed_per_user",
            "tok/s/user",
            "higher",
            "mean over requests of 1 / tpot_i (AIPerf: output_token_throughput_per_user)",
            "output_token_throughput_per_user",
            "token_output_speed_tok_s",
        ),
    )
}

OTHER: dict[str, MetricDef] = {
    d.name: d
    for d in (
        MetricDef(
            "peak_memory",
            "GiB",
            "lower",
            "peak memory during the point: CUDA max_memory_allocated, or on CPU the process's "
            "resident-set high-water mark (VmHWM, reset per point; weights included)",
        ),
        MetricDef("kv_cache_memory", "GiB", "lower", "KV cache allocated for the largest batch"),
        MetricDef(
            "roofline_step_ms",
            "ms",
            "lower",
            "HBM roofline of the target: decode step >= bytes read per GPU per step / HBM "
            "bandwidth (builder.deploy.planner.decode_bound, weights + KV at this batch)",
        ),
        MetricDef(
            "roofline_output_token_throughput",
            "tok/s",
            "higher",
            "target roofline aggregate decode throughput: concurrency / roofline step",
        ),
        MetricDef(
            "roofline_fraction",
            "",
            "higher",
            "measured decode speed per user / roofline decode speed per user (1 / step)",
        ),
    )
}


def stat_key(metric: str, stat: str) -> str:
    return f"{metric}_{stat}"


def definition_of(key: str) -> MetricDef:
    """The definition of a record key (`ttft_p99`, `request_throughput`, ...)."""
    for table in (SYSTEM, OTHER):
        if key in table:
            return table[key]
    base, _, stat = key.rpartition("_")
    if base in DISTRIBUTIONS and stat in STATS:
        d = DISTRIBUTIONS[base]
        how = (
            PERCENTILE_METHOD
            if stat.startswith("p")
            else ("population std" if stat == "std" else "mean")
        )
        return MetricDef(
            key, d.unit, d.better if stat != "std" else "lower", f"{stat} of {d.definition}; {how}"
        )
    raise KeyError(key)


@dataclass(frozen=True)
class RequestTimeline:
    """One request: when it was sent, when each output chunk arrived (seconds, one clock),
    and its token counts. A chunk is one token for the executor; servers may merge tokens."""

    start: float
    chunk_times: tuple[float, ...]
    input_tokens: int
    output_tokens: int

    def __post_init__(self):
        if not self.chunk_times:
            raise ValueError("a request without output has no timeline")
        if self.chunk_times[0] < self.start or list(self.chunk_times) != sorted(self.chunk_times):
            raise ValueError("chunk times must be ordered and not before the start")

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def e2e(self) -> float:
        return self.chunk_times[-1] - self.start

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) / (self.output_tokens - 1)

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q, method="linear"))


def summarize(values: Sequence[float]) -> dict[str, float]:
    """mean, population std and p50/p90/p99 (PERCENTILE_METHOD) of `values`."""
    arr = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=0)),
        "p50": percentile(arr, 50),
        "p90": percentile(arr, 90),
        "p99": percentile(arr, 99),
    }


def run_metrics(requests: Sequence[RequestTimeline]) -> dict[str, float]:
    """Every SYSTEM metric and every DISTRIBUTIONS statistic (ms) of one run."""
    if not requests:
        raise ValueError("no requests")
    duration = max(r.chunk_times[-1] for r in requests) - min(r.start for r in requests)
    out_tokens = sum(r.output_tokens for r in requests)
    in_tokens = sum(r.input_tokens for r in requests)
    tpots = [t for t in (r.tpot for r in requests) if t is not None]
    values = {
        "request_throughput": len(requests) / duration,
        "output_token_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "output_token_throughput_per_user": float(
            np.mean([r.output_tokens / r.e2e for r in requests])
        ),
    }
    if tpots and all(t > 0 for t in tpots):
        values["decode_speed_per_user"] = float(np.mean([1 / t for t in tpots]))
    series = {
        "ttft": [r.ttft for r in requests],
        "tpot": tpots,
        "itl": [g for r in requests for g in r.gaps],
        "e2e_latency": [r.e2e for r in requests],
    }
    for name, seconds in series.items():
        if seconds:
            for stat, value in summarize([s * 1e3 for s in seconds]).items():
                values[stat_key(name, stat)] = value
    return values


def to_metrics(repeats: Iterable[dict[str, float]]) -> dict[str, Metric]:
    """Record metrics: each key's value is the median over repeats, with the repeats kept."""
    repeats = list(repeats)
    keys = [k for k in repeats[0] if all(k in r for r in repeats)]
    metrics = {}
    for key in keys:
        d = definition_of(key)
        metrics[key] = Metric.from_repeats(
            [r[key] for r in repeats], d.unit, d.definition, d.better
        )
    return metrics
