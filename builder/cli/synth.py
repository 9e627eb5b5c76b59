"""`builder synth`: seeded test checkpoints with a preset's block pattern."""

from __future__ import annotations

import re

import click

from builder.arch import PRESETS
from builder.cli.app import main
from builder.errors import UserError


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B?)\s*", text, re.IGNORECASE)
    if not match:
        raise UserError(f"cannot read size {text!r} (expected e.g. 4GB, 512MiB)")
    unit = match[2].upper().rstrip("B")
    scale = {
        "": 1,
        "K": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "KI": 2**10,
        "MI": 2**20,
        "GI": 2**30,
        "TI": 2**40,
    }[unit]
    return int(float(match[1]) * scale)


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--preset", type=click.Choice(sorted(PRESETS)), default="ultra-253b", show_default=True
)
@click.option(
    "--hidden",
    type=int,
    help="Hidden size (multiple of 32; default 256, or the preset's for mixed).",
)
@click.option(
    "--heads",
    type=int,
    default=16,
    show_default=True,
    help="Attention heads (KV heads follow the preset, capped at this).",
)
@click.option("--layers", help="Keep only these preset layers, e.g. '0-12,120-135'.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--target-size", help="Grow the hidden size until the checkpoint reaches this size, e.g. 4GB."
)
@click.option(
    "--dtype",
    type=click.Choice(["bfloat16", "float16", "float32"]),
    default="bfloat16",
    show_default=True,
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def synth(out, preset, hidden, heads, layers, seed, target_size, dtype, overwrite) -> None:
    """Write a synthetic HF nemotron-nas checkpoint to OUT.

    Keeps the preset's block-kind pattern, KV-head counts and ffn_mult values at a reduced
    hidden size (16 heads unless --heads), with seeded random weights, a byte-level tokenizer with
    the
    Nemotron chat template, sharded safetensors and an index. Small by default (seconds);
    --target-size makes multi-GB checkpoints for benchmarks.
    """
    from builder.arch import load_plan
    from builder.cli.common import human_bytes
    from builder.synth import SynthSpec, write_synthetic

    spec = SynthSpec(
        preset=preset,
        hidden=hidden,
        heads=heads,
        layers=layers,
        seed=seed,
        target_bytes=parse_size(target_size) if target_size else None,
        dtype=dtype,
    )
    path = write_synthetic(out, spec, overwrite=overwrite)
    plan = load_plan(path)
    click.echo(
        f"wrote {path}: {plan.num_layers} layers, hidden {plan.hidden_size}, "
        f"{plan.total_params:,} parameters ({human_bytes(plan.total_bytes(dtype))})"
    )
