"""`builder demo`: the embedded default run."""

from __future__ import annotations

from pathlib import Path

import click

from builder.cli.app import main


@main.command()
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/demo"),
    show_default=True,
    help="Where the demo writes its checkpoints and artifacts (replaced on each run).",
)
def demo(workdir: Path) -> None:
    """Run the whole pipeline on small built-in models (~31 CPU-seconds, one torch thread).

    Synthesizes a small checkpoint with Ultra's 162-block pattern, imports the real
    SmolLM2-135M as a nemotron-nas checkpoint, prints their plans, runs the reference
    model with reasoning off, then converts, quantizes (a demo-sized calibration, said as
    such), scores FP8 accuracy, plans the real Ultra targets, dry-runs the engine build and
    writes, checks and (where nvidia-pytriton's tritonserver starts) serves its Triton
    repository, verifies FP8 SmolLM2 against its BF16 golden, and benches the FP8 demo
    artifact against its BF16 source (both verified) into WORKDIR/report/report.html and
    report.md. Nothing is downloaded. Ends with a table of wall and CPU seconds per step.
    """
    from builder.demo import run_demo

    run_demo(workdir)
