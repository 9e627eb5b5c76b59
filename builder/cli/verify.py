"""`builder verify`: an artifact against the BF16 golden, on any runtime, with the fault located."""

from __future__ import annotations

from pathlib import Path

import click

from builder.cli.app import main
from builder.dtypes import COMPUTE
from builder.verify.runtimes import RUNTIMES

HELP = """Check ARTIFACT against the golden written by `builder reference` and write a verdict.

\b
Runtimes (--runtime), each answering "score these token ids; continue this prompt greedily":
  executor  TensorRT-LLM checkpoint (BF16, FP8, W8A16 or a per-layer mix; any tp/pp) through
            builder's PyTorch executor
  resident  the same checkpoint through builder's resident runtime: weights loaded onto
            --device once, CUDA graphs and Triton kernels on a GPU (no --localize)
  hf        unified HF export (quantize OUT/hf: FP8, W8A16 or a mix) through builder's reference
            model with its stored codes and scales: an independent check of that export
  openai    a live OpenAI-compatible server at --url (trtllm-serve, vLLM, SGLang); what it
            supports (prompt log-probs, token ids) is probed first and decides the metrics
  triton    a Triton generate endpoint at --url (/v2/models/--model/generate, return_log_probs):
            greedy metrics only
  trtllm    TensorRT-LLM's LLM API in-process (needs tensorrt_llm installed)

\b
Metrics (builder.verify.metrics): mean and p99 KL(golden || artifact) over the golden's top-k
plus one bucket for the rest of the vocabulary, top-1 agreement, greedy exact-match rate and
mean matching prefix, perplexity and its ratio to the golden's; with a golden made with
--tasks, task accuracy and recovery (artifact / golden) with reasoning off (task_accuracy,
greedy) and on (task_accuracy_reasoning_on, the card's sampling with the golden's seeds).
Limits: the [--section] of --thresholds (default calib/thresholds.toml [verify]).

\b
--localize runs each part of the artifact (embedding, every block, lm_head) alone on the
golden's own hidden states, ranks them by their own output error and names the faulty
part, its kind and width, and its tensors (FP8 scales not matching the calibrated amax,
weights far from the source, files swapped against the manifest).

\b
--report DIR gets the run record (JSON, builder.report.records schema) and the Markdown table;
--history DB also appends it to the SQLite history `builder bench` writes (docs/records.md).
Exit status: 0 pass, 1 fail, 2 bad input.
"""


@main.command(help=HELP)
@click.argument("artifact", required=False, type=click.Path())
@click.option(
    "--golden",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory written by `builder reference`.",
)
@click.option(
    "--runtime",
    "runtime_name",
    type=click.Choice(list(RUNTIMES)),
    default="executor",
    show_default=True,
)
@click.option("--url", help="Server base URL (openai, triton), e.g. http://127.0.0.1:8000.")
@click.option(
    "--model",
    help="Model name on the server (openai: default the first listed; triton: default ensemble).",
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", *COMPUTE]),
    default="auto",
    show_default=True,
    help="Compute dtype of executor/resident/hf (auto: the golden's).",
)
@click.option(
    "--device", default="cpu", show_default=True, help="cpu or cuda (executor, resident, hf)."
)
@click.option(
    "--thresholds",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Thresholds TOML (default calib/thresholds.toml).",
)
@click.option(
    "--section", default="verify", show_default=True, help="Section of the thresholds file."
)
@click.option(
    "--localize",
    is_flag=True,
    help="Run every part alone on the golden's inputs and name the fault.",
)
@click.option("--max-prompts", type=int, help="Score only the first N golden prompts.")
@click.option(
    "--timeout", type=float, default=300.0, show_default=True, help="Seconds per server request."
)
@click.option(
    "--report",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for the run record and the Markdown table.",
)
@click.option(
    "--history",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also append the record to this SQLite history (e.g. runs/history.sqlite).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the run record as JSON instead of the table."
)
@click.pass_context
def verify(
    ctx,
    artifact,
    golden,
    runtime_name,
    url,
    model,
    dtype,
    device,
    thresholds,
    section,
    localize,
    max_prompts,
    timeout,
    report,
    history,
    as_json,
) -> None:
    from builder.verify.golden import DTYPES, Golden
    from builder.verify.run import VerifyOptions
    from builder.verify.run import verify as run_verify
    from builder.verify.runtimes import RuntimeArgs, make_runtime

    say = (lambda m: None) if as_json else (lambda m: click.echo(m, err=True))
    gold = Golden.load(golden)
    compute = DTYPES[gold.settings["dtype"] if dtype == "auto" else dtype]
    args = RuntimeArgs(
        artifact,
        url,
        model,
        compute,
        device,
        int(gold.settings["top_k"]),
        gold.tokenizer() if runtime_name in ("openai", "triton") else None,
        timeout,
    )
    runtime = make_runtime(runtime_name, args)
    try:
        opts = VerifyOptions(
            thresholds,
            section,
            localize,
            max_prompts,
            report,
            {
                "dtype": str(compute).removeprefix("torch.")
                if runtime_name in ("executor", "resident", "hf")
                else None
            },
        )
        result = run_verify(golden, runtime, opts, say)
    finally:
        runtime.close()
    if history is not None:
        from builder.report.history import append_records

        append_records(history, [result.record])
    if as_json:
        from builder.cli.common import echo_json

        echo_json(result.record.to_json())
    else:
        click.echo(result.table)
        click.echo(f"record: {result.record_path}", err=True)
    ctx.exit(result.exit_code)
