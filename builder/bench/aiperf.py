"""Load against a live server with NVIDIA AIPerf (the field's load generator), as a subprocess.

AIPerf has heavy dependencies of its own, so it lives in its own virtual environment
(`.venv-aiperf`, created by scripts/install.sh) and is found as: `--aiperf PATH`, the
`BUILDER_AIPERF` environment variable, `<checkout>/.venv-aiperf/bin/aiperf`, or `aiperf`
on PATH. Each (ISL, OSL, concurrency) point runs `aiperf profile` --repeat times; every
run's `profile_export_aiperf.json` is one repeat of the record (builder.bench.imports).

Workload: synthetic prompts of ISL tokens of the given tokenizer (stddev 0), OSL enforced by
`max_tokens` = OSL with stddev 0 plus, for OpenAI servers, `ignore_eos: true` and
`min_tokens: OSL` as extra inputs (vLLM and TensorRT-LLM servers honour them), streaming,
seeded. The record keeps the measured mean ISL/OSL, so a server that stopped early shows it.
The Triton path is AIPerf's template endpoint on generate_stream (tested against the real
tritonserver serving the generated repository, tests/bench/test_server_bench.py).

AIPerf is given a tokenizer-only copy of --tokenizer (`tokenizer_only`): through a model
directory, transformers' AutoTokenizer also reads config.json, and a nemotron-nas config (the
Ultra's own) does not load without its remote code, so AIPerf would refuse the directory.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from builder.bench.imports import import_reports
from builder.bench.workload import Workload
from builder.errors import UserError
from builder.report.records import RunRecord

EXPORT_NAME = "profile_export_aiperf.json"
CHECKOUT = Path(__file__).resolve().parents[2]


def find_aiperf(explicit: str | None = None) -> Path:
    candidates = [
        explicit,
        os.environ.get("BUILDER_AIPERF"),
        str(CHECKOUT / ".venv-aiperf/bin/aiperf"),
        shutil.which("aiperf"),
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    if explicit:
        raise UserError(f"--aiperf {explicit}: not an executable")
    raise UserError(
        "AIPerf not found: run scripts/install.sh (it creates .venv-aiperf), set "
        "BUILDER_AIPERF, or pass --aiperf PATH"
    )


# Files AutoTokenizer reads; config.json (the model's, possibly remote code) is left out.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def tokenizer_only(tokenizer: str | Path, out_dir: Path) -> Path:
    """A copy of the tokenizer files of `tokenizer` under out_dir/aiperf/tokenizer (the input
    directory is only read)."""
    source = Path(tokenizer)
    if (
        not (source / "tokenizer_config.json").is_file()
        and not (source / "tokenizer.json").is_file()
    ):
        raise UserError(
            f"--tokenizer {tokenizer}: not a local tokenizer directory (nothing is downloaded)"
        )
    target = out_dir / "aiperf" / "tokenizer"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
    return target


TRITON_PAYLOAD = '{"text_input": {{ text|tojson }}, "max_tokens": {{ max_tokens }}, "stream": true}'


def profile_command(
    aiperf: Path,
    url: str,
    model: str,
    tokenizer: str,
    point: Workload,
    artifact_dir: Path,
    repeat_index: int,
    endpoint: str = "openai",
) -> list[str]:
    """The `aiperf profile` command line of one repeat of one point."""
    command = [
        str(aiperf),
        "profile",
        "--model",
        model,
        "--url",
        url,
        "--streaming",
        "--tokenizer",
        tokenizer,
        "--prompt-input-tokens-mean",
        str(point.isl),
        "--prompt-input-tokens-stddev",
        "0",
        "--prompt-output-tokens-mean",
        str(point.osl),
        "--prompt-output-tokens-stddev",
        "0",
        "--concurrency",
        str(point.concurrency),
        "--request-count",
        str(point.requests),
        "--warmup-request-count",
        str(point.warmup),
        "--random-seed",
        str(point.seed + repeat_index),
        "--output-artifact-dir",
        str(artifact_dir),
        "--ui-type",
        "none",
        "--no-server-metrics",
        "--no-gpu-telemetry",
    ]
    if endpoint == "openai":
        command += [
            "--endpoint-type",
            "completions",
            "--extra-inputs",
            "ignore_eos:true",
            "--extra-inputs",
            f"min_tokens:{point.osl}",
        ]
    elif endpoint == "triton":
        # Triton's generate extension: POST /v2/models/<model>/generate_stream, SSE events with
        # text_output (TensorRT-LLM backend ensemble). Extra JSON fields would become unknown
        # model inputs, so OSL rests on max_tokens alone; the record keeps the measured OSL.
        artifact_dir.mkdir(parents=True, exist_ok=True)
        template = artifact_dir / "triton_payload.jinja"
        template.write_text(TRITON_PAYLOAD)
        command += [
            "--endpoint-type",
            "template",
            "--endpoint",
            f"/v2/models/{model}/generate_stream",
            "--extra-inputs",
            f"payload_template:{template}",
            "--extra-inputs",
            "response_field:text_output",
        ]
    else:
        raise ValueError(endpoint)
    return command


def aiperf_environment() -> dict[str, str]:
    """AIPerf 0.13 in HF offline mode looks even a local tokenizer directory up in the hub
    cache (and fails); with a local directory (bench_server insists on one) it never touches
    the network, so the offline variables are dropped for it."""
    return {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }


def run_profile(command: list[str], artifact_dir: Path, timeout: float, log: Path) -> Path:
    """Runs one AIPerf profile (its own process group, killed on timeout) and returns its export."""
    artifact_dir.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=aiperf_environment(),
        )
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
            raise UserError(f"aiperf did not finish within {timeout:.0f} s (log: {log})") from None
        except BaseException:
            os.killpg(process.pid, 9)
            process.wait()
            raise
    # 0.13 also writes phases/warmup/ and phases/profiling/ exports; the top-level one is the run
    top = artifact_dir / EXPORT_NAME
    exports = [top] if top.is_file() else sorted(artifact_dir.rglob(f"profiling/{EXPORT_NAME}"))
    if code != 0 or not exports:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise UserError(
            f"aiperf exited {code} without {EXPORT_NAME} (log: {log}): " + " | ".join(tail)
        )
    return exports[-1]


def bench_server(
    url: str,
    model: str,
    tokenizer: str,
    points: list[Workload],
    out_dir: Path,
    endpoint: str = "openai",
    aiperf: str | None = None,
    timeout: float = 1800,
    progress: Callable[[str], None] | None = None,
) -> list[RunRecord]:
    """One record per point; AIPerf's artifacts stay under out_dir/aiperf/."""
    executable = find_aiperf(aiperf)
    staged = str(tokenizer_only(tokenizer, out_dir))
    records = []
    for number, point in enumerate(points, start=1):
        exports = []
        for repeat in range(point.repeat):
            stamp = time.strftime("%Y%m%dT%H%M%S")
            directory = (
                out_dir
                / "aiperf"
                / f"{point.key.replace(',', '-').replace('=', '')}-r{repeat}-{stamp}"
            )
            if progress:
                progress(
                    f"[{number}/{len(points)}] {point.key} repeat {repeat + 1}/{point.repeat}: "
                    f"aiperf -> {directory}"
                )
            command = profile_command(
                executable, url, model, staged, point, directory, repeat, endpoint
            )
            exports.append(run_profile(command, directory, timeout, directory.with_suffix(".log")))
        record = import_reports(
            exports,
            concurrency=point.concurrency,
            runtime=(
                "aiperf against "
                f"{'Triton' if endpoint == 'triton' else 'an OpenAI-compatible server'}"
            ),
        )
        settings = {
            **record.settings,
            **point.settings(),
            "endpoint": endpoint,
            "url": url,
            "tokenizer": str(Path(tokenizer).resolve()),
            # AIPerf 0.13's template endpoint (Triton) reports no input_sequence_length
            "measured_isl": record.settings["isl"] or None,
            "measured_osl": record.settings["osl"],
            "engine": None,
        }
        records.append(dataclasses.replace(record, settings=settings))
    return records
