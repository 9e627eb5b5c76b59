"""`builder report`: Markdown + self-contained HTML from run records; `report compare`: the gate."""

from __future__ import annotations

from pathlib import Path

import click

from builder.cli.app import main

HELP = """Report run records, or compare two sets of them.

\b
builder report DIR [--out OUT]            records under DIR (bench and verify JSON)
builder report --history DB [--out OUT]   every record of the SQLite history
  writes OUT/report.md (with PNGs beside it) and OUT/report.html (one self-contained
  page, plots inline): bench table, throughput vs concurrency (with the executor's HBM
  roofline), TTFT/ITL percentiles, the throughput-latency curve, verify KL per position
  and per block, and every metric's definition. OUT defaults to DIR (or runs/report).

\b
builder report compare BASE CURRENT [--max-regression 5%] [--metric NAME ...]
  BASE/CURRENT: a record file or a directory of records (with --history DB: an artifact
  sha256 prefix or path in the history). Matches workloads (ISL, OSL, concurrency), prints
  a table and exits 1 on a regression: a gated metric worse by more than --max-regression
  AND by more than the measured spread of either side (medians over repeats; noise is
  reported as "noise"). Gated by default: request/output throughput, tokens/s per user,
  median TTFT, TPOT, ITL and E2E latency.
builder report compare BF16 FP8 --precision
  FP8 artifact beside its BF16 source: per metric the ratio and the speed-up (> 1: FP8
  better), and both artifacts' accuracy from verify records found with them (--verify DIR
  adds more). Informational: exit 0.
"""


@main.command(help=HELP)
@click.argument("args", nargs=-1)
@click.option(
    "--history",
    type=click.Path(dir_okay=False, path_type=Path),
    help="SQLite history (runs/history.sqlite).",
)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Report directory.")
@click.option(
    "--max-regression", default="5%", show_default=True, help="Allowed worsening per gated metric."
)
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    help="Gate these metrics instead of the default set (repeatable).",
)
@click.option(
    "--precision",
    is_flag=True,
    help="FP8-vs-BF16 table (BASE = BF16, CURRENT = FP8) instead of the gate.",
)
@click.option(
    "--verify",
    "verify_dirs",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Extra verify records (precision mode).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def report(args, history, out, max_regression, metrics, precision, verify_dirs, as_json) -> None:
    from builder.cli.common import echo_json
    from builder.errors import UserError
    from builder.report.compare import compare, compare_precision, load_records, parse_threshold

    if args and args[0] == "compare":
        if len(args) != 3:
            raise UserError("report compare: give BASE and CURRENT")
        base, current = load_records(args[1], history), load_records(args[2], history)
        if precision:
            extra = [r for d in verify_dirs for r in load_records(d)]
            table = compare_precision(base, current, extra)
            if as_json:
                echo_json(
                    {
                        "headline": table.headline(),
                        "rows": [
                            {
                                "workload": r.workload,
                                "metric": r.metric,
                                "reference": r.base,
                                "candidate": r.current,
                                "ratio": r.ratio,
                                "speedup": table.speedup(r),
                            }
                            for r in table.rows
                        ],
                        "accuracy": table.accuracy,
                        "warnings": table.warnings,
                    }
                )
            else:
                click.echo(table.markdown())
            if out:
                from builder.report.render import write_report

                write_report([*base, *current, *extra], out, "FP8 vs BF16", table.markdown())
            return
        result = compare(base, current, parse_threshold(max_regression), metrics or None)
        if as_json:
            echo_json(
                {
                    "max_regression": result.max_regression,
                    "regressions": len(result.regressions),
                    "rows": [
                        {
                            "workload": r.workload,
                            "metric": r.metric,
                            "base": r.base,
                            "current": r.current,
                            "worse": r.worse,
                            "noise": r.noise,
                            "verdict": r.verdict(result.max_regression),
                        }
                        for r in result.rows
                    ],
                    "notes": result.unmatched + result.warnings,
                }
            )
        else:
            click.echo(result.markdown())
        if result.regressions:
            raise SystemExit(1)
        return
    from builder.report.render import write_report

    if bool(args) == bool(history):
        raise UserError("give a records DIR or --history DB (not both)")
    if len(args) > 1:
        raise UserError(f"one records DIR expected, got {len(args)} arguments")
    if history:
        from builder.report.history import History

        with History(history) as db:
            records = db.query()
        target = out or Path("runs/report")
    else:
        records = load_records(args[0])
        target = out or Path(args[0])
    if not records:
        raise UserError("no run records to report")
    paths = write_report(records, target)
    if as_json:
        echo_json({k: str(v) for k, v in paths.items()})
    else:
        click.echo(f"{paths['html']}\n{paths['markdown']}")
