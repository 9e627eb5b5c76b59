"""`builder plan`: memory, KV-cache, disk and time plan of a model on deployment targets."""

from __future__ import annotations

from typing import Any

import click

from builder.cli.app import main
from builder.cli.common import echo_json, preset_option

EXIT_DOES_NOT_FIT = 1  # 2 is bad input (UserError), as for every command

# Direct flags and the profile field each one sets (any field: --set SECTION.FIELD=VALUE).
DIRECT_FLAGS = {
    "max_seq_len": "build.max_seq_len",
    "max_batch_size": "build.max_batch_size",
    "max_num_tokens": "build.max_num_tokens",
    "kv_fraction": "runtime.kv_cache_free_gpu_mem_fraction",
    "isl": "runtime.isl",
    "osl": "runtime.osl",
    "tp": "parallel.tp",
    "pp": "parallel.pp",
}


def target_overrides(func):
    """--set plus the direct shortcuts, shared by `plan` and `build`."""
    options = [
        click.option(
            "--set",
            "sets",
            multiple=True,
            metavar="SECTION.FIELD=VALUE",
            help="Override any profile field, e.g. --set build.max_batch_size=32 "
            "(values are TOML literals; repeat for several).",
        ),
        click.option("--max-seq-len", type=int, help="= --set build.max_seq_len=N"),
        click.option("--max-batch-size", type=int, help="= --set build.max_batch_size=N"),
        click.option("--max-num-tokens", type=int, help="= --set build.max_num_tokens=N"),
        click.option(
            "--kv-fraction",
            type=float,
            help="= --set runtime.kv_cache_free_gpu_mem_fraction=F (fraction of free memory)",
        ),
        click.option(
            "--isl", type=int, help="Input tokens per request for the concurrency figure."
        ),
        click.option(
            "--osl", type=int, help="Output tokens per request for the concurrency figure."
        ),
        click.option("--tp", type=int, help="= --set parallel.tp=N"),
        click.option("--pp", type=int, help="= --set parallel.pp=N"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def collect_overrides(sets: tuple[str, ...], direct: dict[str, Any]) -> list[tuple[str, Any]]:
    from builder.deploy.profiles import parse_override

    overrides = [parse_override(text) for text in sets]
    overrides += [
        (DIRECT_FLAGS[name], value)
        for name, value in direct.items()
        if name in DIRECT_FLAGS and value is not None
    ]
    return overrides


@main.command()
@click.argument("checkpoint", required=False, type=click.Path(file_okay=False))
@preset_option
@click.option(
    "--target",
    "targets",
    multiple=True,
    metavar="NAME|FILE.toml",
    help="Target profile: a shipped name (engines/*.toml) or a TOML file; repeat for "
    "several. Default: the mission targets h100x8-bf16, h100x4-fp8, b100x4-fp8.",
)
@target_overrides
@click.option(
    "--recipe",
    "recipe_path",
    type=click.Path(exists=True),
    default=None,
    help="A per-linear recipe (JSON, or a `builder quantize` OUT whose manifest records one): "
    "also show what its weights cost per rank on each target.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Machine-readable output (every figure, in bytes)."
)
def plan(
    checkpoint: str | None,
    preset: str | None,
    targets: tuple[str, ...],
    sets: tuple[str, ...],
    recipe_path: str | None,
    as_json: bool,
    **direct: Any,
) -> None:
    """Plan CHECKPOINT (HF dir or TensorRT-LLM checkpoint) or --preset on deployment targets.

    \b
    For each target, from the same per-layer plan convert uses:
      - weight bytes per rank (BF16, or FP8 linears + scales with BF16 embedding/lm_head/norms)
      - KV-cache bytes per token per rank (attention layers only, each with its KV heads)
      - activation + runtime reserve estimates, the free memory, the KV tokens that fit at the
        KV fraction and the concurrent ISL+OSL sequences
      - disk, host RAM and time lower bounds of convert, quantize and trtllm-build
      - TP checks per layer (heads, KV heads, FFN widths) and PP balance by parameters with
        a suggested partition
      - the decode-speed bound from HBM bandwidth, and a verdict: fits or not, and why.
    Example: builder plan --preset ultra-253b --target h100x4-fp8 --max-seq-len 16384

    \b
    Exit codes (scripts can gate on them; the plan is printed either way):
      0  every target fits
      1  some target does not fit, or its tp x pp split is impossible
      2  bad input (unknown target, bad --set, unreadable checkpoint)
    """
    from rich.console import Console

    from builder.deploy import MISSION_TARGETS, plan_for, render_plan

    overrides = collect_overrides(sets, direct)
    results = [plan_for(t, checkpoint, preset, overrides) for t in (targets or MISSION_TARGETS)]
    memory = [None] * len(results)
    if recipe_path is not None:
        from builder.deploy.recipe_memory import load_recipe_source, recipe_memory

        recipe = load_recipe_source(recipe_path)
        memory = [recipe_memory(r, recipe) if r.ranks else None for r in results]
    if as_json:
        plans = [
            r.to_dict() | ({"recipe_memory": m} if m else {})
            for r, m in zip(results, memory, strict=True)
        ]
        echo_json({"source": checkpoint or f"preset {preset}", "plans": plans})
    else:
        from builder.deploy.recipe_memory import format_recipe_memory

        console = Console()
        for result, mem in zip(results, memory, strict=True):
            console.print(render_plan(result))
            if mem:
                console.print(format_recipe_memory(result.profile.name, mem))
            console.print()
    if not all(r.fits for r in results):
        raise SystemExit(EXIT_DOES_NOT_FIT)
