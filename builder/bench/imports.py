"""Reports other tools write, turned into run records with our metric names.

- `trtllm-bench ... --report_json FILE` (TensorRT-LLM `bench/dataclasses/reporting.py`,
  `ReportUtility.get_statistics_dict`): sections engine, machine, world_info, request_info,
  performance, streaming_metrics (with --streaming), decoding_stats, dataset. Latencies in ms,
  percentile dicts with keys minimum/maximum/average/p50/p90/p95/p99 (nearest rank).
- AIPerf `profile_export_aiperf.json` (`exporters/metrics_json_exporter.py`, JsonExportData):
  one object per metric tag ({unit, avg, min, max, std, p1 ... p99, count}; std population,
  percentiles linear), plus schema_version, aiperf_version, input_config, run_info.

Metric names map as builder.bench.metrics documents; a metric a report lacks is left out,
never invented. Records say which tool measured (`runtime`) and which percentile method
applies (`settings.percentile_method`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from builder.bench.metrics import DISTRIBUTIONS, SYSTEM, stat_key, to_metrics
from builder.errors import UserError
from builder.report.records import Artifact, RecordKind, RunRecord

TRTLLM_PERCENTILE_METHOD = "nearest rank without interpolation: sorted[int(n*q)] (trtllm-bench)"
AIPERF_PERCENTILE_METHOD = "linear interpolation between closest ranks (AIPerf)"
TIME_UNITS_TO_MS = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3, "sec": 1e3}


def load_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such report") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: unreadable report ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a report is a JSON object")
    return data


def report_format(data: dict[str, Any]) -> str:
    if "performance" in data and "request_info" in data:
        return "trtllm-bench"
    if "aiperf_version" in data or ("input_config" in data and "request_throughput" in data):
        return "aiperf"
    return "unknown"


# ---- trtllm-bench ----------------------------------------------------------------------------
TRTLLM_STATS = {"mean": "average", "p50": "p50", "p90": "p90", "p99": "p99"}


def trtllm_values(data: dict[str, Any], source: str) -> dict[str, float]:
    try:
        perf = data["performance"]
        values = {
            name: float(perf[d.trtllm_bench])
            for name, d in SYSTEM.items()
            if d.trtllm_bench in perf and d.trtllm_bench != "token_output_speed_tok_s"
        }
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(
            f"{source}: malformed trtllm-bench report, performance section ({err})"
        ) from None
    distributions = {"e2e_latency": perf.get("request_latency_percentiles_ms")}
    streaming = data.get("streaming_metrics") or {}
    if streaming:
        distributions["ttft"] = streaming.get("ttft_percentiles")
        distributions["tpot"] = streaming.get("tpot_percentiles")
        if "token_output_speed_tok_s" in streaming:
            values["decode_speed_per_user"] = float(streaming["token_output_speed_tok_s"])
    for name, table in distributions.items():
        for ours, theirs in TRTLLM_STATS.items():
            if isinstance(table, dict) and theirs in table:
                values[stat_key(name, ours)] = float(table[theirs])
    return values


def trtllm_record(
    data: dict[str, Any], source: str, concurrency: int | None
) -> tuple[RunRecord, dict[str, float]]:
    values = trtllm_values(data, source)
    engine = data.get("engine") or {}
    world = data.get("world_info") or {}
    requests = data.get("request_info") or {}
    machine = data.get("machine") or {}
    isl = round(float(requests.get("avg_input_length", 0)))
    osl = round(float(requests.get("avg_output_length", 0)))
    if concurrency is None:
        concurrency = round(float(requests.get("avg_num_concurrent_requests", 0) or 0)) or int(
            world.get("max_batch_size", 0) or 0
        )
    backend = str(engine.get("backend", "unknown"))
    settings = {
        "isl": isl,
        "osl": osl,
        "concurrency": concurrency,
        "workload": f"isl={isl},osl={osl},concurrency={concurrency}",
        "requests": requests.get("num_requests"),
        "tp": world.get("tp_size"),
        "pp": world.get("pp_size"),
        "engine": backend == "TRT",
        "backend": backend,
        "streaming": bool(data.get("streaming_metrics")),
        "quantization": engine.get("quantization"),
        "kv_cache_dtype": engine.get("kv_cache_dtype"),
        "percentile_method": TRTLLM_PERCENTILE_METHOD,
        "imported_from": str(source),
        "osl_enforced": "as the dataset's output_tokens and trtllm-bench's --eos_id decided",
    }
    model = str(engine.get("model") or engine.get("model_path") or "unknown")
    path = str(engine.get("engine_dir") or engine.get("model_path") or "")
    kind = "trtllm-engine" if backend == "TRT" else "trtllm-pytorch"
    if engine.get("quantization"):
        kind += f"-{str(engine['quantization']).lower()}"
    record = RunRecord(
        kind=RecordKind.BENCH,
        model=model,
        artifact=Artifact(path, kind, hashlib.sha256(f"{model}|{path}".encode()).hexdigest()),
        runtime=f"trtllm-bench ({backend}, TensorRT-LLM {engine.get('version', '?')})",
        target=path,
        device=str(machine.get("name", "")),
        settings=settings,
        metrics={},
        details={
            "report": {
                k: data[k]
                for k in ("engine", "machine", "world_info", "request_info", "dataset")
                if k in data
            }
        },
    )
    return record, values


# ---- AIPerf ----------------------------------------------------------------------------------
AIPERF_STATS = {"mean": "avg", "std": "std", "p50": "p50", "p90": "p90", "p99": "p99"}


def _ms(entry: dict[str, Any], key: str, source: str, tag: str) -> float:
    unit = str(entry.get("unit", "ms")).lower()
    if unit not in TIME_UNITS_TO_MS:
        raise UserError(f"{source}: {tag}.unit {unit!r} is not a time unit")
    return float(entry[key]) * TIME_UNITS_TO_MS[unit]


def aiperf_values(data: dict[str, Any], source: str) -> dict[str, float]:
    values: dict[str, float] = {}
    try:
        for name, d in SYSTEM.items():
            entry = data.get(d.aiperf) if d.aiperf else None
            if isinstance(entry, dict) and entry.get("avg") is not None:
                values[name] = float(entry["avg"])
        isl, osl = data.get("input_sequence_length"), data.get("output_sequence_length")
        total = data.get("total_token_throughput")
        if isinstance(total, dict) and total.get("avg") is not None:
            values["total_token_throughput"] = float(total["avg"])
        elif "request_throughput" in values and isinstance(isl, dict) and isinstance(osl, dict):
            # sum(ISL + OSL) / T = N / T x mean(ISL + OSL)
            values["total_token_throughput"] = values["request_throughput"] * (
                float(isl["avg"]) + float(osl["avg"])
            )
        for name, d in DISTRIBUTIONS.items():
            entry = data.get(d.aiperf)
            if isinstance(entry, dict):
                for ours, theirs in AIPERF_STATS.items():
                    if entry.get(theirs) is not None:
                        values[stat_key(name, ours)] = _ms(entry, theirs, source, d.aiperf)
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(
            f"{source}: malformed AIPerf export ({type(err).__name__}: {err})"
        ) from None
    if not values:
        raise UserError(f"{source}: no AIPerf metrics found (profile_export_aiperf.json expected)")
    return values


def _dig(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def aiperf_record(
    data: dict[str, Any], source: str, concurrency: int | None, runtime: str | None = None
) -> tuple[RunRecord, dict[str, float]]:
    values = aiperf_values(data, source)
    config = data.get("input_config") or {}
    # 0.13 writes models.items[].name and phases[] (warmup, profiling); older: endpoint.model_names,
    # loadgen
    items = _dig(config, "models", "items") or []
    models = (
        [i.get("name") for i in items if isinstance(i, dict)]
        or _dig(config, "endpoint", "model_names")
        or ["unknown"]
    )
    urls = _dig(config, "endpoint", "urls") or [_dig(config, "endpoint", "url") or ""]
    phases = [
        p
        for p in (config.get("phases") or [])
        if isinstance(p, dict) and p.get("kind") == "profiling"
    ]
    isl = round(float(_dig(data, "input_sequence_length", "avg") or 0))
    osl = round(float(_dig(data, "output_sequence_length", "avg") or 0))
    if concurrency is None:
        concurrency = int(
            (phases[0].get("concurrency") if phases else None)
            or _dig(config, "loadgen", "concurrency")
            or 0
        )
    url = str(urls[0] if isinstance(urls, list) and urls else urls)
    model = str(models[0])
    settings = {
        "isl": isl,
        "osl": osl,
        "concurrency": concurrency,
        "workload": f"isl={isl},osl={osl},concurrency={concurrency}",
        "requests": _dig(data, "request_count", "avg"),
        "engine": None,
        "endpoint_type": _dig(config, "endpoint", "type"),
        "streaming": _dig(config, "endpoint", "streaming"),
        "percentile_method": AIPERF_PERCENTILE_METHOD,
        "imported_from": str(source),
        "aiperf_version": data.get("aiperf_version"),
        "aiperf_schema_version": data.get("schema_version"),
        "osl_enforced": "AIPerf output-token mean with stddev 0 plus ignore_eos/min_tokens extra "
        "inputs, if the run set them; osl is the measured mean",
    }
    record = RunRecord(
        kind=RecordKind.BENCH,
        model=model,
        artifact=Artifact(url, "server", hashlib.sha256(model.encode()).hexdigest()),
        runtime=runtime or f"aiperf {data.get('aiperf_version', '?')} against a server",
        target=url,
        device="",
        settings=settings,
        metrics={},
        details={"aiperf_run_info": data.get("run_info")},
    )
    return record, values


# ---- records -----------------------------------------------------------------------------------
def import_reports(
    paths: list[str | Path], concurrency: int | None = None, runtime: str | None = None
) -> RunRecord:
    """One record from one or more reports of the same run repeated (the repeats)."""
    if not paths:
        raise UserError("bench import: give at least one report")
    first, repeats = None, []
    for path in paths:
        data = load_json(path)
        fmt = report_format(data)
        if fmt == "trtllm-bench":
            record, values = trtllm_record(data, str(path), concurrency)
        elif fmt == "aiperf":
            record, values = aiperf_record(data, str(path), concurrency, runtime)
        else:
            raise UserError(
                f"{path}: neither a trtllm-bench --report_json report nor an AIPerf "
                "profile_export_aiperf.json"
            )
        if first is not None and record.settings["workload"] != first.settings["workload"]:
            raise UserError(
                f"{path}: workload {record.settings['workload']} differs from "
                f"{first.settings['workload']} of {paths[0]}"
            )
        first = first or record
        repeats.append(values)
    return dataclasses.replace(
        first, metrics=to_metrics(repeats), settings={**first.settings, "repeat": len(repeats)}
    )
