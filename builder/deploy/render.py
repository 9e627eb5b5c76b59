"""Rich tables for a TargetPlan (the human side of `builder plan`)."""

from __future__ import annotations

import io

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from builder.deploy.planner import GIB, TargetPlan


def gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _ranges(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return str(ranks[0])
    return (
        f"{ranks[0]}-{ranks[-1]}"
        if ranks == list(range(ranks[0], ranks[-1] + 1))
        else ",".join(map(str, ranks))
    )


def decode_at_concurrency(result: TargetPlan) -> tuple[str, str]:
    """The aggregate decode row; when no sequence fits it says why instead of '= 0 tok/s'."""
    p, d = result.profile, result.decode
    if d["concurrency"]:
        return (
            f"decode step >= (batch {d['concurrency']}, ctx {d['context_tokens']})",
            f"{d['step_ms_at_concurrency']:.1f} ms = {d['tokens_per_s_aggregate']:,.0f} tok/s "
            "total",
        )
    worst = max(result.ranks, key=lambda m: m.used_before_kv)
    if worst.free <= 0:
        why = f"rank {worst.rank} has no memory left for a KV cache"
    else:
        why = (
            f"the KV pool ({result.kv_tokens:,} tokens per rank) holds no "
            f"{p.runtime.isl}+{p.runtime.osl}-token sequence"
        )
    return "decode at concurrency", f"none: {why}"


def memory_table(result: TargetPlan) -> Table:
    """Per-rank memory; ranks with identical figures share a row."""
    p = result.profile
    staged = p.parallel.pp > 1
    table = Table(
        title=f"{p.name}: {p.layout_summary}, {p.hardware.gpu_memory_gib:.1f} GiB per GPU, "
        f"{p.runtime.runtime_reserve_gib:.1f} GiB runtime reserve*"
    )
    columns = [
        "ranks",
        *(["stage"] if staged else []),
        "tensors",
        "weights\nGiB",
        "activ.*\nGiB",
        "free\nGiB",
        "KV B per\ntoken",
        "KV pool\nGiB",
        "KV\ntokens",
    ]
    for col in columns:
        table.add_column(col, justify="right")
    groups: dict[tuple, list[int]] = {}
    for m in result.ranks:
        key = (
            m.pp_rank,
            m.tensors,
            m.weights,
            m.activations,
            m.free,
            m.kv_bytes_per_token,
            m.kv_pool,
            m.kv_tokens,
        )
        groups.setdefault(key, []).append(m.rank)
    for key, ranks in groups.items():
        stage, tensors, weights, act, free, kv_b, pool, tokens = key
        table.add_row(
            _ranges(ranks),
            *([str(stage)] if staged else []),
            f"{tensors:,}",
            f"{weights / GIB:.2f}",
            f"{act / GIB:.2f}",
            f"{free / GIB:.2f}",
            f"{kv_b:,}",
            f"{pool / GIB:.2f}",
            "-" if tokens is None else f"{tokens:,}",
        )
    table.caption = "* estimates (formulas: plan --json, 'formulas')"
    return table


def _stage_rows(table: Table, label: str, stages: list[dict]) -> None:
    for s in stages:
        table.add_row(
            label,
            str(s["first_layer"]),
            str(s["layers"]),
            str(s["attention_layers"]),
            f"{s['layer_params'] / 1e9:.1f} B",
            f"{s['params'] / 1e9:.1f} B",
        )
        label = ""


def pipeline_table(result: TargetPlan) -> Table:
    pipe = result.pipeline
    table = Table(title=f"Pipeline stages (pp={pipe['pp']}), parameters per stage")
    for col in ("partition", "first layer", "layers", "attention", "layer params", "with emb/head"):
        table.add_column(col, justify="right")
    if "equal_layers" in pipe:
        _stage_rows(table, "equal counts (TRT-LLM)", pipe["equal_layers"])
    if "suggested" in pipe:
        _stage_rows(table, f"suggested {pipe['suggested_pp_partition']}", pipe["suggested"])
    return table


def summary_table(result: TargetPlan) -> Table:
    p, d = result.profile, result.decode
    table = Table(title="Summary", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    worst = max(result.ranks, key=lambda m: m.used_before_kv)
    rows = [
        (
            "layout",
            (
                f"tp={p.parallel.tp} pp={p.parallel.pp}, {p.precision.weights} weights, "
                f"{p.precision.kv_cache} KV"
            ),
        ),
        ("weights per rank (max)", gib(worst.weights)),
        ("KV bytes per token, all ranks", f"{result.model.kv_bytes_per_token(p.kv_dtype):,} B"),
        ("KV bytes per token per rank", f"{worst.kv_bytes_per_token:,} B"),
        (
            f"KV tokens at fraction {p.runtime.kv_cache_free_gpu_mem_fraction}",
            "-" if result.kv_tokens is None else f"{result.kv_tokens:,}",
        ),
        (
            f"sequences of {p.runtime.isl}+{p.runtime.osl} that fit",
            "-"
            if result.sequences_fit is None
            else f"{result.sequences_fit:,} (batch limit {p.build.max_batch_size})",
        ),
        (
            "decode step >= (batch 1)",
            (
                f"{d['step_ms_batch1']:.1f} ms = "
                f"{d['tokens_per_s_per_sequence']:.0f} tok/s per sequence"
            ),
        ),
        decode_at_concurrency(result),
    ]
    tp = result.tp
    rows.append(
        (
            "heads / KV heads per rank",
            f"{tp['query_heads_per_rank']:g} / {', '.join(map(str, tp['kv_heads_per_rank']))}",
        )
    )
    widths = tp["ffn_width_per_rank"]
    if widths:
        rows.append(
            ("FFN width per rank", f"{min(widths):,} ... {max(widths):,} ({len(widths)} widths)")
        )
    rows.append(
        ("per-layer TP/PP problems", str(len(tp["problems"])) if tp["problems"] else "none")
    )
    if tp["layers_with_duplicated_kv_heads"]:
        rows.append(
            ("layers with duplicated KV heads", str(len(tp["layers_with_duplicated_kv_heads"])))
        )
    for name, value in rows:
        table.add_row(name, value)
    return table


def host_table(result: TargetPlan) -> Table:
    table = Table(title="Host side: disk, RAM, time lower bounds")
    for col in ("step", "reads GiB", "writes GiB", "host RAM* GiB", "time >="):
        table.add_column(col, justify="right")
    notes = []
    for name, step in result.host["steps"].items():
        ram = f"{step['host_ram'] / GIB:,.1f}" + ("" if step["fits_host_ram"] else " (too much)")
        table.add_row(
            name,
            f"{step['reads'] / GIB:,.1f}",
            f"{step['disk_written'] / GIB:,.1f}",
            ram,
            _duration(step["seconds_lower_bound"]),
        )
        notes.append(f"{name}: {step['output']}")
    table.caption = (
        "; ".join(notes) + f". Pipeline disk total {gib(result.host['disk_total_pipeline'])}."
    )
    return table


def verdict_text(result: TargetPlan) -> Text:
    style = "bold green" if result.fits else "bold red"
    text = Text(f"{result.profile.name}: {result.verdict}", style=style)
    for note in result.warnings:
        text.append(f"\n  note: {note}", style="yellow")
    return text


def render_plan(result: TargetPlan) -> Group:
    """Everything `builder plan` prints for one target."""
    if not result.ranks:
        return Group(verdict_text(result))
    parts = [memory_table(result), summary_table(result)]
    if result.profile.parallel.pp > 1:
        parts.append(pipeline_table(result))
    parts += [host_table(result), verdict_text(result)]
    return Group(*parts)


def plan_text(result: TargetPlan, width: int = 140) -> str:
    """The rendered plan as plain text (for logs, reports and the demo)."""
    buffer = io.StringIO()
    Console(file=buffer, width=width, no_color=True, highlight=False).print(render_plan(result))
    return buffer.getvalue()
