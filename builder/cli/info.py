"""`builder info`: the per-layer plan of a checkpoint or preset."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from builder.arch import ModelPlan, check_parallelism
from builder.arch.summary import layer_rows, rank_summary, totals
from builder.cli.app import main
from builder.cli.common import echo_json, human_bytes, human_count, preset_option, resolve_plan


@main.command()
@click.argument("checkpoint", required=False, type=click.Path(file_okay=False))
@preset_option
@click.option("--tp", type=int, default=None, help="Also show per-rank tensor shapes for this TP.")
@click.option("--pp", type=int, default=1, show_default=True, help="Pipeline stages (with --tp).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--layers/--no-layers", default=True, show_default=True, help="Print the per-layer table."
)
def info(
    checkpoint: str | None, preset: str | None, tp: int | None, pp: int, as_json: bool, layers: bool
) -> None:
    """Print the per-layer plan of CHECKPOINT (an HF nemotron-nas directory) or --preset.

    Shows each block's attention kind (attention / linear / no_op) with its KV heads,
    its FFN kind with its width, and its parameters; then totals, BF16 and FP8 sizes and
    KV-cache bytes per token. With --tp/--pp it checks the layout and lists per-rank
    tensor shapes of the TensorRT-LLM checkpoint that `convert` would write.
    """
    plan = resolve_plan(checkpoint, preset)
    ranks = None
    if tp is not None:
        check_parallelism(plan, tp, pp)
        ranks = rank_summary(plan, tp, pp)
    if as_json:
        echo_json({"totals": totals(plan), "layers": layer_rows(plan), "parallel": ranks})
        return
    console = Console()
    if layers:
        console.print(_layer_table(plan))
    console.print(_totals_table(plan))
    if ranks:
        console.print(_rank_table(ranks))
        for table in _shape_tables(ranks):
            console.print(table)


def _layer_table(plan: ModelPlan) -> Table:
    table = Table(title=f"Per-layer plan: {plan.source}", show_lines=False)
    for col in ("layer", "attention", "kv heads", "ffn", "ffn width", "params"):
        table.add_column(col, justify="right" if col != "attention" and col != "ffn" else "left")
    for row in layer_rows(plan):
        table.add_row(
            str(row["index"]),
            row["attention"],
            str(row["kv_heads"] or "-"),
            row["ffn"],
            f"{row['ffn_width']:,}" if row["ffn_width"] else "-",
            human_count(row["params"]),
        )
    return table


def _totals_table(plan: ModelPlan) -> Table:
    t = totals(plan)
    c = t["counts"]
    table = Table(title="Totals", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [
        ("layers", f"{c['layers']} ({c['empty']} fully empty)"),
        (
            "attention / linear / no_op",
            f"{c['attention']} / {c['linear_attention']} / {c['no_op_attention']}",
        ),
        ("mlp / linear / no_op FFN", f"{c['mlp']} / {c['linear_ffn']} / {c['no_op_ffn']}"),
        ("KV heads in attention layers", ", ".join(map(str, t["kv_heads"])) or "-"),
        (
            "FFN widths",
            f"{min(t['ffn_widths']):,} ... {max(t['ffn_widths']):,}" if t["ffn_widths"] else "-",
        ),
        ("parameters", f"{t['params']:,} ({human_count(t['params'])})"),
        ("BF16 size", human_bytes(t["bytes_bf16"])),
        ("FP8 linears + BF16 rest", human_bytes(t["bytes_fp8_linears"])),
        (
            "KV cache per token (BF16 / FP8)",
            f"{t['kv_cache_bytes_per_token_bf16']:,} B / {t['kv_cache_bytes_per_token_fp8']:,} B",
        ),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def _rank_table(ranks: dict) -> Table:
    table = Table(title=f"TensorRT-LLM checkpoint, tp={ranks['tp']} pp={ranks['pp']} (BF16)")
    for col in ("rank", "tensors", "bytes"):
        table.add_column(col, justify="right")
    for r in ranks["ranks"]:
        table.add_row(str(r["rank"]), str(r["tensors"]), human_bytes(r["bytes"]))
    return table


def _shape_tables(ranks: dict) -> list[Table]:
    """Per-rank tensor shapes; ranks with identical shapes (one pipeline stage) share a table."""
    groups: dict[tuple, list[int]] = {}
    for r in ranks["ranks"]:
        groups.setdefault(
            tuple((name, tuple(shape)) for name, shape in r["shapes"].items()), []
        ).append(r["rank"])
    tables = []
    for shapes, members in groups.items():
        label = str(members[0]) if len(members) == 1 else f"{members[0]}-{members[-1]}"
        table = Table(
            title=f"Tensor shapes of rank{'s' if len(members) > 1 else ''} {label} "
            f"(tp={ranks['tp']} pp={ranks['pp']})"
        )
        table.add_column("tensor")
        table.add_column("shape", justify="right")
        for name, shape in shapes:
            table.add_row(name, "[" + ", ".join(f"{n:,}" for n in shape) + "]")
        tables.append(table)
    return tables
