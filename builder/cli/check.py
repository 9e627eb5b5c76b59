"""`builder check`: verify any artifact builder writes against its manifest and the plan."""

from __future__ import annotations

import click

from builder.cli.app import main
from builder.errors import UserError


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option(
    "--source",
    type=click.Path(file_okay=False),
    help=(
        "TensorRT-LLM checkpoints: also check that this HF checkpoint is the one it was converted "
        "from (fingerprint)."
    ),
)
@click.option(
    "--quick",
    is_flag=True,
    help="Sizes and headers only; skip re-hashing the files and the NaN/Inf scan.",
)
@click.option(
    "--roundtrip",
    is_flag=True,
    help=(
        "With --source: un-shard every tensor with the inverse split rules and compare it bit for "
        "bit with the source (holds one whole tensor at a time)."
    ),
)
@click.option(
    "--json", "as_json", is_flag=True, help="Machine-readable report (no progress output)."
)
def check(directory: str, source: str | None, quick: bool, roundtrip: bool, as_json: bool) -> None:
    """Verify DIRECTORY, any artifact builder wrote; its manifest's kind says what it is.

    \b
    Every kind: manifest.json lists every file with its size and digest (blake3; sha256 in
    older manifests), nothing unlisted; every floating tensor is scanned for NaN/Inf
    (streamed, tensor by tensor) and a non-finite value fails naming the tensor; every FP8
    scale must be finite and positive.
    \b
      hf-checkpoint       (synth, import-smollm2) config.json parses to a plan; index and
                          shards hold exactly the plan's tensor names, shapes and dtype
      hf-fp8-checkpoint   (quantize OUT/hf) the same with E4M3 weights, weight_scale and
                          input_scale per linear, k_scale/v_scale with an FP8 KV cache;
                          hf_quant_config.json, config.json and manifest agree
      trtllm-checkpoint   (convert, quantize OUT/trtllm; BF16 or FP8) config.json mapping
                          matches the manifest; each rank file's header is exactly what
                          the plan implies for that rank
      fp8-quantization    (quantize OUT) its manifest and amax.json, then trtllm/ and hf/
      build outputs       the manifest (files, sizes, digests)
    On a staging directory (.OUT.partial of an unfinished or multi-host conversion) it lists
    which ranks are done and which are missing. It prints what it checked (kind, dtype, FP8,
    KV-cache dtype, files, tensors). Exit code 0 when everything verifies, 2 if not.
    """
    from rich.console import Console

    from builder.check import check_artifact, describe
    from builder.cli.common import echo_json
    from builder.progress import reporter

    if roundtrip and not source:
        raise UserError("--roundtrip needs --source HF_DIR")
    with reporter("check", enabled=not as_json) as progress:
        report = check_artifact(directory, source=source, hashes=not quick, progress=progress)
        if roundtrip and report.ok:
            from builder.convert.roundtrip import roundtrip_problems

            for problem in roundtrip_problems(directory, source, progress=progress):
                report.problem(problem)
    if as_json:
        echo_json(report.to_json())
    else:
        console = Console(soft_wrap=True)
        for problem in report.problems:
            console.print(f"[red]-[/red] {problem}", highlight=False)
        if report.ok:
            extra = "; round trip bit-exact" if roundtrip else ""
            console.print(
                f"[green]ok[/green] {directory}: {describe(report)}{extra}", highlight=False
            )
    if not report.ok:
        raise UserError(f"{directory}: {len(report.problems)} problem(s) found")
