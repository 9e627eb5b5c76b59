"""Console output of `builder quantize`: the closing summary (progress: builder.progress)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def human(n: float) -> str:
    from builder.units import human_bytes

    return human_bytes(n)


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
    table = Table("step", "seconds")
    for step, seconds in summary.seconds.items():
        table.add_row(step, f"{seconds:,.1f}")
    console.print(table)
    memory = (
        f"peak RSS {human(summary.peak_rss_bytes)} for a {human(summary.model_bytes)} checkpoint"
    )
    if summary.peak_gpu_bytes is not None:
        memory += f", peak GPU {human(summary.peak_gpu_bytes)}"
    console.print(memory)
    for kind, path in summary.paths.items():
        console.print(f"{kind}: {path}")
