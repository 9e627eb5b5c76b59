"""`builder check`: verify a TensorRT-LLM checkpoint against its manifest and the plan."""

from __future__ import annotations

import click

from builder.cli.app import main
from builder.errors import UserError


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--source", type=click.Path(file_okay=False), help="Also check that this HF checkpoint is the one it was converted from (fingerprint).")
@click.option("--quick", is_flag=True, help="Sizes and headers only; skip re-hashing the files.")
@click.option("--roundtrip", is_flag=True, help="With --source: un-shard every tensor with the inverse split rules and compare it bit for bit with the source (holds one whole tensor at a time).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
def check(directory: str, source: str | None, quick: bool, roundtrip: bool, as_json: bool) -> None:
    """Verify DIRECTORY, a TensorRT-LLM checkpoint written by `builder convert`.

    \b
    - manifest.json: every file present with its size and sha256, nothing unlisted;
    - config.json: a valid DeciLM config whose mapping matches the manifest;
    - each rank file's header: exactly the tensor names, shapes and dtypes the plan implies
      for that rank (FP8 names and scales when config.json says quant_algo FP8), and data
      that covers the file.
    On a staging directory (.OUT.partial of an unfinished or multi-host conversion) it lists
    which ranks are done and which are missing. Exit code 0 when everything verifies, 2 if not.
    """
    from rich.console import Console

    from builder.cli.common import echo_json
    from builder.convert.check import check_checkpoint

    if roundtrip and not source:
        raise UserError("--roundtrip needs --source HF_DIR")
    report = check_checkpoint(directory, source=source, hashes=not quick)
    if roundtrip and report.ok:
        from builder.convert.roundtrip import roundtrip_problems

        for problem in roundtrip_problems(directory, source):
            report.problem(problem)
    if as_json:
        echo_json(report.to_json())
    else:
        console = Console(soft_wrap=True)
        for problem in report.problems:
            console.print(f"[red]-[/red] {problem}", highlight=False)
        if report.ok:
            what = "sizes and headers" if quick else "sha256, sizes and headers"
            extra = "; round trip bit-exact" if roundtrip else ""
            console.print(
                f"[green]ok[/green] {directory}: {len(report.ranks)} rank files (tp={report.tp}, "
                f"pp={report.pp}, {report.dtype}); {what} verified{extra}"
            )
    if not report.ok:
        raise UserError(f"{directory}: {len(report.problems)} problem(s) found")
