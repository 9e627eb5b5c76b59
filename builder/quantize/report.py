"""Console output of `builder quantize`: the closing summary (progress: builder.progress)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from builder.units import human_bytes


def print_summary(summary: Any, console: Console | None = None) -> None:
    console = console or Console()
    blocks = summary.blocks
    console.print(
        f"[bold]FP8 calibration[/bold] of {summary.source}: {blocks['blocks_calibrated']} blocks "
        f"calibrated, {blocks['blocks_resumed']} resumed, {blocks['blocks_empty_skipped']} empty "
        f"skipped ({blocks['layers']} layers)"
    )
    cal = summary.calibration
    console.print(
        f"data {cal['dataset']}: {cal['size']} x {cal['seq_len']} tokens, sha256 "
        f"{cal['sha256'][:16]}..."
    )
    rounding = getattr(summary, "rounding", None) or {}
    if rounding.get("method") == "gptq":
        console.print(
            f"rounding: GPTQ (damping {rounding['damp']:g}, "
            f"{'act-order' if rounding['act_order'] else 'in order'}, H in chunks of "
            f"{rounding['chunk']:,} columns); both exports hold the same stored codes"
        )
    table = Table("step", "seconds")
    for step, seconds in summary.seconds.items():
        table.add_row(step, f"{seconds:,.1f}")
    console.print(table)
    memory = (
        f"peak RSS {human_bytes(summary.peak_rss_bytes)} for a "
        f"{human_bytes(summary.model_bytes)} checkpoint"
    )
    if summary.peak_gpu_bytes is not None:
        memory += f", peak GPU {human_bytes(summary.peak_gpu_bytes)}"
    console.print(memory)
    weights = blocks.get("weights")
    if weights and weights["blocks"]:
        console.print(
            f"weights streamed: {human_bytes(weights['bytes'])} in {weights['blocks']} blocks, "
            f"{weights['stream_gb_per_s']} GB/s over calibration (loads "
            f"{weights['load_seconds']:.1f} s, waited {weights['wait_seconds']:.1f} s, prefetch "
            f"{'on' if weights['prefetch'] else 'off'})"
        )
    for kind, path in summary.paths.items():
        console.print(f"{kind}: {path}")
