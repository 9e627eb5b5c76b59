"""`builder triton BUILD_DIR OUT` (write a Triton model repository) and `builder triton check
OUT`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from builder.cli.app import main
from builder.cli.common import echo_json


class _GenerateByDefault(click.Group):
    """`builder triton BUILD_DIR OUT ...` runs `generate`; `builder triton check OUT` checks."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["generate", *args]
        return super().parse_args(ctx, args)


@main.group(cls=_GenerateByDefault)
def triton() -> None:
    """Triton Inference Server model repositories of a build, and their check.

    \b
    builder triton BUILD_DIR OUT --tokenizer DIR [options]
        writes the repository for what `builder build` recorded in BUILD_DIR: engines
        (a real engine directory or the --dry-run record) get the in-flight batching
        repository (preprocessing, tensorrt_llm, postprocessing, ensemble, tensorrt_llm_bls)
        and launch scripts for tp x pp MPI ranks; a `--backend pytorch` bundle gets the
        LLM-API repository (one tensorrt_llm Python model, options in 1/model.yaml).
    builder triton check OUT
        parses every config.pbtxt as Triton's ModelConfig and checks the models against
        each other, the engine and the tokenizer. Exit 0 ok, 1 findings, 2 bad input.
    See docs/triton.md.
    """


@triton.command("generate")
@click.argument("build_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--tokenizer",
    "tokenizer",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help=(
        "HF tokenizer directory (usually the HF checkpoint); referenced by absolute path, not "
        "copied."
    ),
)
@click.option(
    "--max-batch-size",
    type=int,
    help="Triton max_batch_size of every model (default and maximum: "
    "the engine's built max_batch_size).",
)
@click.option(
    "--decoupled",
    is_flag=True,
    help="Decoupled mode on tensorrt_llm and tensorrt_llm_bls: needed "
    "for streaming (`stream: true`, gRPC stream / generate_stream).",
)
@click.option(
    "--kv-fraction",
    type=float,
    help="kv_cache_free_gpu_mem_fraction (default: the target profile's).",
)
@click.option(
    "--max-kv-tokens",
    type=int,
    help="max_tokens_in_paged_kv_cache cap (default: none; fraction only).",
)
@click.option(
    "--batch-scheduler-policy",
    type=click.Choice(["guaranteed_no_evict", "max_utilization"]),
    default="guaranteed_no_evict",
    show_default=True,
)
@click.option(
    "--kv-cache-reuse/--no-kv-cache-reuse",
    default=False,
    show_default=True,
    help="enable_kv_cache_reuse (prefix caching; the engine needs paged context FMHA).",
)
@click.option(
    "--include-input/--exclude-input",
    "include_input",
    default=False,
    show_default=True,
    help="Whether text_output repeats the prompt (exclude_input_in_output default).",
)
@click.option(
    "--tokenizer-instances",
    type=int,
    default=4,
    show_default=True,
    help="Instances of preprocessing and postprocessing.",
)
@click.option(
    "--bls-instances", type=int, help="Instances of tensorrt_llm_bls (default: max_batch_size)."
)
@click.option(
    "--accumulate-tokens",
    is_flag=True,
    help="tensorrt_llm_bls streaming: every response carries "
    "the text of all tokens so far instead of the new token's.",
)
@click.option("--http-port", type=int, default=8000, show_default=True)
@click.option("--grpc-port", type=int, default=8001, show_default=True)
@click.option("--metrics-port", type=int, default=8002, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the generation record as JSON.")
def generate(
    build_dir: str,
    out: str,
    tokenizer: str,
    max_batch_size: int | None,
    decoupled: bool,
    kv_fraction: float | None,
    max_kv_tokens: int | None,
    batch_scheduler_policy: str,
    kv_cache_reuse: bool,
    include_input: bool,
    tokenizer_instances: int,
    bls_instances: int | None,
    accumulate_tokens: bool,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    overwrite: bool,
    as_json: bool,
) -> None:
    """Write the Triton model repository of BUILD_DIR into OUT."""
    from builder.triton import TritonOptions, read_build_record, write_repository
    from builder.triton.check import check_repository, format_findings

    record = read_build_record(build_dir)
    options = TritonOptions(
        tokenizer_dir=Path(tokenizer),
        max_batch_size=max_batch_size,
        decoupled=decoupled,
        kv_fraction=kv_fraction,
        max_kv_tokens=max_kv_tokens,
        batch_scheduler_policy=batch_scheduler_policy,
        enable_kv_cache_reuse=kv_cache_reuse,
        exclude_input_in_output=not include_input,
        tokenizer_instances=tokenizer_instances,
        bls_instances=bls_instances,
        accumulate_tokens=accumulate_tokens,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
    )
    generated = write_repository(record, options, out, overwrite=overwrite)
    findings = check_repository(out)
    if as_json:
        echo_json({**generated, "check": [f.to_json() for f in findings]})
    else:
        settings = generated["settings"]
        click.echo(
            f"{out}: {generated['layout']} repository ({', '.join(generated['models'])}); "
            f"max_batch_size {settings['max_batch_size']}, world size {generated['world_size']}, "
            f"decoupled {decoupled}, KV fraction {settings['kv_fraction']}"
        )
        scripts = sorted(p.name for p in (Path(out) / "launch").glob("*.sh"))
        click.echo(f"  launch scripts in {Path(out) / 'launch'}: {', '.join(scripts)}")
        for line in format_findings(findings):
            click.echo(line, err=True)
    if any(f.is_error for f in findings):
        sys.exit(1)


@triton.command("check")
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def check(out: str, as_json: bool) -> None:
    """Check the Triton model repository OUT. Exit 0 ok, 1 findings, 2 bad input."""
    from builder.triton.check import check_repository, format_findings

    findings = check_repository(out)
    if as_json:
        echo_json(
            {
                "repository": str(out),
                "ok": not any(f.is_error for f in findings),
                "findings": [f.to_json() for f in findings],
            }
        )
    else:
        for line in format_findings(findings):
            click.echo(line, err=any(f.is_error for f in findings))
        if not any(f.is_error for f in findings):
            click.echo(f"{out}: ok")
    sys.exit(1 if any(f.is_error for f in findings) else 0)
