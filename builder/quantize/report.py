"""Console output of `builder quantize`: a progress bar over blocks and the closing summary."""

from __future__ import annotations

from typing import Any, Self

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from builder.arch.plan import LayerPlan


class BlockBar:
    """"calibrating block i" with done/total, ETA; on stderr, so stdout stays machine-readable."""

    def __init__(self, enabled: bool = True, console: Console | None = None):
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]calibrating"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[note]}"),
            console=console or Console(stderr=True),
            transient=True,
        )
        self._task = None

    def __enter__(self) -> Self:
        if self.enabled:
            self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._progress.__exit__(*exc)

    def update(self, done: int, total: int, layer: LayerPlan | None) -> None:
        if not self.enabled:
            return
        note = f"block {layer.index} ({layer.short})" if layer else ""
        if self._task is None:
            self._task = self._progress.add_task("blocks", total=total, note=note)
        self._progress.update(self._task, completed=done, total=total, note=note)


def human(n: float) -> str:
    from builder.cli.common import human_bytes

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
        f"data {cal['dataset']}: {cal['size']} x {cal['seq_len']} tokens, sha256 {cal['sha256'][:16]}..."
    )
    table = Table("step", "seconds")
    for step, seconds in summary.seconds.items():
        table.add_row(step, f"{seconds:,.1f}")
    console.print(table)
    memory = f"peak RSS {human(summary.peak_rss_bytes)} for a {human(summary.model_bytes)} checkpoint"
    if summary.peak_gpu_bytes is not None:
        memory += f", peak GPU {human(summary.peak_gpu_bytes)}"
    console.print(memory)
    for kind, path in summary.paths.items():
        console.print(f"{kind}: {path}")
