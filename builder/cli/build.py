"""`builder build`: TensorRT engines (trtllm-build, TensorRT-LLM <= 1.2.x) or PyTorch-backend
options."""

from __future__ import annotations

from typing import Any

import click

from builder.cli.app import main
from builder.cli.common import echo_json
from builder.cli.plan import collect_overrides, target_overrides
from builder.deploy.backends import BACKENDS, BuildRequest


def _progress_bar(console):
    """A rich progress bar driven by (what, done, total) callbacks."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    tasks: dict[str, int] = {}

    def update(what: str, done: int, total: int) -> None:
        if what not in tasks:
            tasks[what] = bar.add_task(what, total=total)
        bar.update(tasks[what], completed=done, total=total)

    return bar, update


@main.command()
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path())  # a file at OUT: refused by check_replaceable
@click.option(
    "--target",
    required=True,
    metavar="NAME|FILE.toml",
    help="Target profile: a shipped name (engines/*.toml) or a TOML file.",
)
@click.option(
    "--backend",
    type=click.Choice(BACKENDS.names()),
    default="engine",
    show_default=True,
    help="engine: SOURCE is a TensorRT-LLM checkpoint, run trtllm-build. pytorch: SOURCE is "
    "an HF checkpoint (BF16) or the unified HF FP8 export; write trtllm-serve options.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Engine backend: check everything and write the command, build configuration, plan "
    "and report without TensorRT-LLM; no engine is built.",
)
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Re-hash every file against the checkpoint's manifest (sizes are always checked).",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@target_overrides
@click.option("--json", "as_json", is_flag=True, help="Print the build report as JSON.")
def build(
    source: str,
    out: str,
    target: str,
    backend: str,
    dry_run: bool,
    verify: bool,
    overwrite: bool,
    sets: tuple[str, ...],
    as_json: bool,
    **direct: Any,
) -> None:
    """Build SOURCE for --target into OUT.

    \b
    Engine backend (default): SOURCE is a TensorRT-LLM checkpoint from `builder convert` or
    `builder quantize`. Its tp/pp, quantization and manifest checksums must match the target;
    the trtllm-build arguments come from the profile and are checked against the pinned
    release's flag set. Needs TensorRT-LLM 1.2.x or earlier (pip install 'builder[trtllm]'
    or the NGC tensorrt-llm release container); writes the rank engines, build.log,
    build_report.json (command, versions, wall time, engine sizes), plan.json, launch/.
    --dry-run writes all of that except the engines, without TensorRT-LLM.
    \b
    PyTorch backend: SOURCE is an HF checkpoint; OUT gets llm_api_options.yaml for
    `trtllm-serve --extra_llm_api_options`, launch scripts (one node, mpirun, Slurm) and plan.json.
    """
    from pathlib import Path

    from rich.console import Console

    from builder.deploy import load_profile
    from builder.io.atomic import check_output_location, check_replaceable

    check_output_location(out, [source])
    check_replaceable(Path(out), overwrite)  # before an engine build, not after it
    profile = load_profile(target, collect_overrides(sets, direct))
    request = BuildRequest(Path(source), profile, Path(out), dry_run, verify, overwrite)
    console = Console(stderr=True)
    bar, update = _progress_bar(console)
    with bar:
        result = BACKENDS.get(backend)(
            request,
            progress=update,
            on_log=lambda line: bar.console.print(line, style="dim", markup=False, highlight=False),
        )
    if as_json:
        echo_json(result.report)
        return
    what = "engines built" if result.report.get("engine_built") else "no engine built"
    console.print(f"[green]{result.out}[/green]: {what}; {len(result.files)} files")
    console.print(f"plan: {result.plan.verdict}")
    for name in result.files:
        console.print(f"  {name}")
