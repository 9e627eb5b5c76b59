"""`builder convert`: HF nemotron-nas checkpoint -> TensorRT-LLM checkpoint (rank files)."""

from __future__ import annotations

from contextlib import ExitStack

import click

from builder.arch import PRESETS
from builder.cli.app import main
from builder.dtypes import COMPUTE
from builder.errors import UserError

HELP = """Convert HF_DIR (an HF nemotron-nas checkpoint) to a TensorRT-LLM checkpoint in OUT.

\b
OUT/config.json           DeciLMForCausalLM config: per-layer layer_configs, mapping, ...
OUT/rank{R}.safetensors   R = pp_rank * tp + tp_rank; per-rank [q|k|v] with KV heads
                          duplicated when tp exceeds a layer's KV heads, lm_head padded to
                          a multiple of tp, stage-local layer indices, nothing for no-op parts
OUT/manifest.json         blake3 and size of every file, tensors per rank, source
                          fingerprint, tool version, tp/pp/dtype

Streaming: each rank file's header is computed from the plan, then tensors are appended
in order from row/column slices of the source, so memory stays at about one 64 MiB block
per worker whatever the model size. Input is validated first (every expected tensor present
with the config's shape and dtype, none unused, tp/pp possible, enough disk space); NaN/Inf
in a weight stops the run naming the tensor.

\b
Integrity and resuming: everything is written into .OUT.partial/ beside OUT; each rank file
is renamed from .tmp when complete and recorded in .OUT.partial/ranks/rank{R}.json (size,
blake3, layout, source fingerprint). OUT appears only when every rank is there.
--resume keeps ranks whose record matches and whose file re-hashes correctly.

\b
Several hosts: run e.g. `--ranks 0-3` on one host and `--ranks 4-7` on another with the
same OUT on a shared filesystem; each writes only its ranks, and the run that completes the
set writes manifest.json and renames the directory. Without a shared filesystem, copy every
host's rank{R}.safetensors and ranks/rank{R}.json into one .OUT.partial/ and run the same
command with --resume: it verifies them, converts whatever is missing, and finalizes.
`builder check .OUT.partial` shows which ranks are still missing.

\b
Safety: OUT may not be, contain or lie inside HF_DIR (refused even with --overwrite), and
--overwrite replaces only a directory. One run per OUT: .OUT.partial/ is locked (flock)
while a run and its workers live; a second run is refused naming the process that holds
it. Workers die with the command (kill -9 included). A --dtype cast that turns a finite
weight into Inf, or flushes to zero a value larger than the cast's own rounding error, is
an error naming the tensor and the value. Pickle weights are read only with --allow-pickle.
HF hub cache snapshots (symlinks into the repository's blobs/) are accepted.

\b
--dry-run reads headers only (or nothing, with --preset NAME instead of HF_DIR) and writes
OUT/manifest.json listing every rank's tensor names, shapes, dtypes and bytes:
  builder convert --preset ultra-253b --tp 8 --dry-run ultra-tp8-plan
"""


def parse_paths(paths: tuple[str, ...], preset: str | None) -> tuple[str | None, str]:
    if preset:
        if len(paths) != 1:
            raise UserError("with --preset give only OUT (no HF_DIR)")
        return None, paths[0]
    if len(paths) != 2:
        raise UserError("expected HF_DIR OUT (or --preset NAME --dry-run OUT)")
    return paths[0], paths[1]


@main.command(help=HELP)
@click.argument("paths", nargs=-1, metavar="[HF_DIR] OUT")
@click.option("--tp", type=int, required=True, help="Tensor-parallel size.")
@click.option(
    "--pp",
    type=int,
    default=1,
    show_default=True,
    help="Pipeline stages (must divide the layer count).",
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", *COMPUTE]),
    default="auto",
    show_default=True,
    help="Output dtype; auto = the checkpoint's torch_dtype.",
)
@click.option(
    "--workers",
    type=int,
    default=1,
    show_default=True,
    help="Ranks converted in parallel processes.",
)
@click.option(
    "--ranks", help="Convert only these ranks, e.g. 0-3 or 0-1,6-7 (several hosts, one job)."
)
@click.option("--dry-run", is_flag=True, help="Write only the manifest of what would be produced.")
@click.option(
    "--preset",
    type=click.Choice(sorted(PRESETS)),
    help="Plan from a built-in config (needs --dry-run).",
)
@click.option("--resume", is_flag=True, help="Keep rank files from an interrupted run that verify.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option(
    "--no-finite-check", is_flag=True, help="Skip the NaN/Inf scan of every weight block."
)
@click.option(
    "--allow-pickle",
    is_flag=True,
    help=(
        "Read pytorch_model*.bin weights if HF_DIR has no safetensors (torch.load, weights only). "
        "Refused by default: unpickling can run code."
    ),
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the summary as JSON (no progress bars)."
)
def convert(
    paths,
    tp,
    pp,
    dtype,
    workers,
    ranks,
    dry_run,
    preset,
    resume,
    overwrite,
    no_finite_check,
    allow_pickle,
    as_json,
) -> None:
    src, out = parse_paths(paths, preset)
    with ExitStack() as stack:
        pool = None
        if workers > 1 and not dry_run:
            # Started before the input is read, so they are ready when the rank jobs are.
            # They hold OUT's stage lock with this process, so a resume cannot start while
            # any of them lives.
            from builder.convert.workers import WorkerPool
            from builder.io.atomic import check_output_location, lock_stage

            check_output_location(out, [src])
            lock = stack.enter_context(lock_stage(out, shared=ranks is not None))
            pool = stack.enter_context(WorkerPool(workers, inherit=[lock.fd]))
        run_convert(
            src,
            out,
            tp,
            pp,
            dtype,
            workers,
            ranks,
            dry_run,
            preset,
            resume,
            overwrite,
            no_finite_check,
            allow_pickle,
            as_json,
            pool,
        )


def run_convert(
    src,
    out,
    tp,
    pp,
    dtype,
    workers,
    ranks,
    dry_run,
    preset,
    resume,
    overwrite,
    no_finite_check,
    allow_pickle,
    as_json,
    pool,
) -> None:
    from builder.arch import preset_plan
    from builder.cli.common import echo_json
    from builder.convert import ConvertRequest, convert, write_dry_run
    from builder.convert.pipeline import resolve_dtype
    from builder.convert.progress import RankProgress
    from builder.progress import reporter

    if preset:
        if not dry_run:
            raise UserError("--preset has no weights: it works only with --dry-run")
        plan = preset_plan(preset)
        summary = write_dry_run(
            plan,
            out,
            tp,
            pp,
            resolve_dtype(dtype, plan),
            source=f"preset {preset}",
            overwrite=overwrite,
        )
    else:
        request = ConvertRequest(
            src,
            out,
            tp,
            pp,
            dtype,
            workers=workers,
            ranks=ranks,
            resume=resume,
            dry_run=dry_run,
            overwrite=overwrite,
            check_finite=not no_finite_check,
            allow_pickle=allow_pickle,
        )
        progress = None if as_json else RankProgress(reporter("convert"))
        summary = convert(request, progress=progress, pool=pool)
    if as_json:
        echo_json(summary.to_json())
    else:
        print_summary(summary)


def print_summary(summary) -> None:
    from rich.console import Console
    from rich.table import Table

    from builder.cli.common import human_bytes
    from builder.units import MIB

    console = Console()
    title = "dry run: would write" if summary.dry_run else "TensorRT-LLM checkpoint"
    table = Table(
        title=f"{title} {summary.out} (tp={summary.tp}, pp={summary.pp}, {summary.dtype})"
    )
    for col in ("rank", "tp", "pp", "status", "tensors", "bytes", "seconds", "MiB/s", "digest"):
        table.add_column(col, justify="left" if col in ("status", "digest") else "right")
    for r in summary.ranks:
        speed = f"{r.bytes / r.seconds / MIB:,.0f}" if r.seconds else "-"
        table.add_row(
            str(r.rank),
            str(r.tp_rank),
            str(r.pp_rank),
            r.status,
            str(r.tensors),
            human_bytes(r.bytes),
            f"{r.seconds:.1f}" if r.seconds else "-",
            speed,
            (r.digest or "-")[:12],
        )
    console.print(table)
    total = sum(r.bytes for r in summary.ranks)
    console.print(
        f"total {human_bytes(total)} in {len(summary.ranks)} rank files; largest single tensor "
        f"{human_bytes(summary.largest_slice_bytes)}; {summary.seconds:.1f} s"
    )
    if summary.manifest:
        console.print(f"manifest: {summary.manifest}")
    for note in summary.notes:
        console.print(f"[yellow]{note}[/yellow]")
