"""`builder bench`: throughput and latency as run records (JSON files + SQLite history)."""

from __future__ import annotations

from pathlib import Path

import click

from builder.cli.app import main

HELP = """Measure throughput and latency of TARGET and write one run record per workload
point (ISL, OSL, concurrency) to --out, appended to the --history database.

\b
TARGET is one of:
  CHECKPOINT            a TensorRT-LLM checkpoint, run in this process by one of builder's
                        PyTorch runtimes (--runtime; CPU or --device cuda): "executor", the
                        reference, or "resident", weights loaded onto the device once (on
                        CUDA: decode steps as CUDA graphs, the Triton kernels). Not an
                        engine: records name the runtime; concurrency is the batch size
                        (static batches decoded together through the KV cache). Each record
                        carries the HBM roofline of --roofline-target for this checkpoint's
                        layout beside the measurement (bytes read per GPU per decode step /
                        bandwidth).
  --url URL             an OpenAI-compatible server (vLLM, trtllm-serve, SGLang): the load
                        comes from NVIDIA AIPerf (its own venv, .venv-aiperf; see --aiperf),
                        /v1/completions streaming; its profile_export_aiperf.json is ingested.
  --triton URL          a Triton server's generate_stream endpoint, driven by AIPerf.
  import REPORT...      ingest existing reports: trtllm-bench --report_json output or AIPerf
                        profile_export_aiperf.json (several files: repeats of one point).

\b
Workload: prompts of exactly ISL random token ids (seeded), exactly OSL output tokens
(EOS ignored), --warmup requests first, then --repeat runs of --requests requests at each
--concurrency. Metrics (definitions in docs/records.md and builder/bench/metrics.py):
request throughput, output and total tokens/s, tokens/s per user, TTFT, TPOT, ITL (vLLM's
sense: gaps between streamed tokens; AIPerf calls TPOT "inter_token_latency"), E2E latency
(mean, std, p50/p90/p99, linear-interpolated percentiles), peak memory. Each metric's value
is the median over repeats, its spread (max - min) is kept for noise-aware comparisons.
"""


def _pairs(isl: str, osl: str) -> list[tuple[int, int]]:
    from builder.bench.workload import parse_counts
    from builder.errors import UserError

    isls, osls = parse_counts(isl, "--isl"), parse_counts(osl, "--osl")
    if len(osls) == 1:
        osls = osls * len(isls)
    if len(isls) == 1:
        isls = isls * len(osls)
    if len(isls) != len(osls):
        raise UserError(
            f"--isl has {len(isls)} values and --osl {len(osls)}: give pairs (or one OSL)"
        )
    return list(zip(isls, osls, strict=True))


def _summary_table(records) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"bench: {records[0].model} ({records[0].runtime})")
    columns = [
        ("req/s", "request_throughput"),
        ("out tok/s", "output_token_throughput"),
        ("tok/s/user", "output_token_throughput_per_user"),
        ("TTFT p50", "ttft_p50"),
        ("TPOT p50", "tpot_p50"),
        ("ITL p99", "itl_p99"),
        ("peak GiB", "peak_memory"),
        ("roofline tok/s", "roofline_output_token_throughput"),
    ]
    table.add_column("ISL/OSL c")
    for title, _ in columns:
        table.add_column(title, justify="right")
    for record in records:
        s = record.settings
        row = [f"{s.get('isl')}/{s.get('osl')} c{s.get('concurrency')}"]
        for _, key in columns:
            metric = record.metrics.get(key)
            row.append("-" if metric is None else f"{metric.value:,.4g}")
        table.add_row(*row)
    Console(stderr=True, width=max(Console().width, 110)).print(table)
    click.echo("latencies in ms; values are medians over repeats", err=True)


@main.command(help=HELP, context_settings={"ignore_unknown_options": False})
@click.argument("target", nargs=-1)
@click.option("--url", help="OpenAI-compatible server base URL (e.g. http://127.0.0.1:8000).")
@click.option("--triton", "triton_url", help="Triton server HTTP URL (e.g. http://127.0.0.1:8000).")
@click.option("--model", help="Served model name (--url / --triton).")
@click.option(
    "--tokenizer", help="Tokenizer directory for AIPerf's synthetic prompts (--url / --triton)."
)
@click.option(
    "--isl",
    default="128",
    show_default=True,
    help="Input lengths, comma-separated (paired with --osl).",
)
@click.option(
    "--osl",
    default="128",
    show_default=True,
    help="Output lengths, comma-separated (one value: for every ISL).",
)
@click.option(
    "--concurrency",
    default="1,4",
    show_default=True,
    help="Concurrency levels, comma-separated (executor: batch sizes).",
)
@click.option(
    "--requests",
    type=click.IntRange(1),
    default=None,
    help="Requests per run [default: 2 x concurrency].",
)
@click.option(
    "--warmup",
    type=click.IntRange(0),
    default=1,
    show_default=True,
    help="Warm-up requests before each point (not measured).",
)
@click.option(
    "--repeat",
    type=click.IntRange(1),
    default=3,
    show_default=True,
    help="Runs per point; values are medians, spread kept.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16"]),
    default="float32",
    show_default=True,
    help="In-process runtime (CHECKPOINT): compute dtype.",
)
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="In-process runtime (CHECKPOINT): cpu or cuda[:N].",
)
@click.option(
    "--threads",
    type=click.IntRange(1),
    default=None,
    help=(
        "Executor: torch CPU threads [default: torch's]; 1 is fastest for small models on a busy "
        "machine."
    ),
)
@click.option(
    "--runtime",
    type=click.Choice(["executor", "resident"]),
    default="executor",
    show_default=True,
    help="CHECKPOINT: the in-process runtime (builder.bench.inprocess.RUNTIMES).",
)
@click.option(
    "--roofline-target",
    default="h200x8-bf16",
    show_default=True,
    help="Target profile whose HBM bandwidth sets the roofline beside executor measurements.",
)
@click.option(
    "--aiperf",
    "aiperf_path",
    help="AIPerf executable [default: $BUILDER_AIPERF, .venv-aiperf/bin/aiperf, PATH].",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/bench"),
    show_default=True,
    help="Directory for the run records.",
)
@click.option(
    "--history",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("runs/history.sqlite"),
    show_default=True,
    help="SQLite history the records are appended to.",
)
@click.option("--no-history", is_flag=True, help="Do not append to the history.")
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON.")
def bench(
    target,
    url,
    triton_url,
    model,
    tokenizer,
    isl,
    osl,
    concurrency,
    requests,
    warmup,
    repeat,
    seed,
    dtype,
    device,
    threads,
    runtime,
    roofline_target,
    aiperf_path,
    out,
    history,
    no_history,
    as_json,
) -> None:
    from builder.bench.workload import parse_counts, workloads
    from builder.cli.common import echo_json
    from builder.errors import UserError
    from builder.report.history import append_records
    from builder.report.records import write_record

    say = (lambda m: None) if as_json else (lambda m: click.echo(m, err=True))
    sources = sum(bool(x) for x in (target, url, triton_url))
    if sources != 1:
        raise UserError(
            "give exactly one of: CHECKPOINT, --url URL, --triton URL, or import REPORT..."
        )
    if runtime != "executor" and not (target and target[0] != "import"):
        raise UserError(f"--runtime {runtime}: only a CHECKPOINT runs in this process")
    if target and target[0] == "import":
        from builder.bench.imports import import_reports

        if len(target) < 2:
            raise UserError("bench import: give at least one REPORT file")
        counts = parse_counts(concurrency, "--concurrency") if concurrency != "1,4" else [None]
        records = [import_reports(list(target[1:]), concurrency=counts[0])]
    else:
        points = workloads(
            _pairs(isl, osl),
            parse_counts(concurrency, "--concurrency"),
            requests,
            warmup,
            repeat,
            seed,
        )
        if target:
            if len(target) != 1:
                raise UserError(f"one CHECKPOINT expected, got {len(target)} arguments")
            from builder.bench.inprocess import bench_checkpoint

            records = bench_checkpoint(
                target[0],
                points,
                dtype=dtype,
                device=device,
                target=roofline_target,
                progress=say,
                threads=threads,
                runtime=runtime,
            )
        else:
            from builder.bench.aiperf import bench_server

            if not model or not tokenizer:
                raise UserError(
                    "--url / --triton need --model (served name) and --tokenizer (directory)"
                )
            records = bench_server(
                url or triton_url,
                model,
                tokenizer,
                points,
                out,
                endpoint="openai" if url else "triton",
                aiperf=aiperf_path,
                progress=say,
            )
    paths = [write_record(out, record) for record in records]
    if not no_history:
        append_records(history, records)
    if as_json:
        echo_json([r.to_json() for r in records])
        return
    _summary_table(records)
    say(
        f"records: {', '.join(str(p) for p in paths)}"
        + ("" if no_history else f"; history: {history}")
    )
