"""`builder report`: Markdown and one self-contained HTML page from run records.

Plots (matplotlib, Agg backend, embedded as base64 PNG so the page needs nothing else):
- output tokens/s against concurrency, one line per artifact and ISL/OSL, spread as error
  bars, the executor's HBM roofline dashed where the records carry it;
- TTFT and ITL percentiles (p50/p90/p99) against concurrency;
- the throughput-latency curve (output tokens/s against median TPOT, points = concurrency);
- from verify records: KL per position (details["kl_per_position"]) and per block
  (details["kl_per_block"], else the localization ranking's per-block error).
"""

from __future__ import annotations

import base64
import html
import io
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.bench.metrics import definition_of
from builder.report.records import RecordKind, RunRecord

TABLE_METRICS = (
    "request_throughput",
    "output_token_throughput",
    "output_token_throughput_per_user",
    "ttft_p50",
    "ttft_p99",
    "tpot_p50",
    "itl_p50",
    "itl_p99",
    "e2e_latency_p50",
    "peak_memory",
    "roofline_output_token_throughput",
)


@dataclass(frozen=True)
class Plot:
    title: str
    description: str
    png: bytes


def series_label(record: RunRecord) -> str:
    s = record.settings
    return f"{record.artifact.kind} {record.model} {s.get('isl')}/{s.get('osl')} ({record.runtime})"


def bench_series(records: list[RunRecord]) -> dict[str, list[RunRecord]]:
    """Bench records grouped by artifact and ISL/OSL, sorted by concurrency (latest per point)."""
    groups: dict[str, dict[int, RunRecord]] = defaultdict(dict)
    for record in sorted(records, key=lambda r: r.created):
        if record.kind is RecordKind.BENCH:
            groups[series_label(record)][int(record.settings.get("concurrency") or 0)] = record
    return {label: [points[c] for c in sorted(points)] for label, points in sorted(groups.items())}


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _figure().close(fig)
    return buffer.getvalue()


def _values(points: list[RunRecord], key: str) -> tuple[list[int], list[float], list[float]]:
    xs, ys, errs = [], [], []
    for record in points:
        if key in record.metrics:
            xs.append(int(record.settings.get("concurrency") or 0))
            ys.append(record.metrics[key].value)
            errs.append(record.metrics[key].spread / 2)
    return xs, ys, errs


def throughput_plot(series: dict[str, list[RunRecord]]) -> Plot:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in series.items():
        xs, ys, errs = _values(points, "output_token_throughput")
        line = ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=label)
        rx, ry, _ = _values(points, "roofline_output_token_throughput")
        if rx:
            ax.plot(
                rx,
                ry,
                linestyle="--",
                color=line[0].get_color(),
                alpha=0.6,
                label=f"roofline: {label}",
            )
    ax.set(
        xlabel="concurrency (executor: batch size)",
        ylabel="output tokens/s",
        title="Throughput vs concurrency",
    )
    ax.set_xscale("log", base=2)
    if any(_values(p, "roofline_output_token_throughput")[0] for p in series.values()):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return Plot(
        "Throughput vs concurrency",
        "Output tokens/s (median over repeats, bars: spread) at each concurrency; dashed: the "
        "target's HBM roofline for the same layout (planner decode bound).",
        _png(fig),
    )


def latency_percentiles_plot(series: dict[str, list[RunRecord]]) -> Plot:
    plt = _figure()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, name in ((axes[0], "ttft", "TTFT"), (axes[1], "itl", "ITL")):
        for label, points in series.items():
            for stat, style in (("p50", "-"), ("p90", "--"), ("p99", ":")):
                xs, ys, _ = _values(points, f"{metric}_{stat}")
                if xs:
                    ax.plot(xs, ys, linestyle=style, marker="o", label=f"{stat} {label}")
        ax.set(xlabel="concurrency", ylabel="ms", title=f"{name} percentiles")
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    return Plot(
        "TTFT and ITL percentiles",
        "p50 (solid), p90 (dashed), p99 (dotted) of time to first token and of inter-token "
        "latency (gaps between streamed tokens, pooled) against concurrency.",
        _png(fig),
    )


def throughput_latency_plot(series: dict[str, list[RunRecord]]) -> Plot:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in series.items():
        pts = [
            (
                r.metrics["tpot_p50"].value,
                r.metrics["output_token_throughput"].value,
                r.settings.get("concurrency"),
            )
            for r in points
            if "tpot_p50" in r.metrics and "output_token_throughput" in r.metrics
        ]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            for x, y, c in pts:
                ax.annotate(f"c{c}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(
        xlabel="median TPOT (ms per output token per user)",
        ylabel="output tokens/s (system)",
        title="Throughput-latency curve",
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return Plot(
        "Throughput-latency curve",
        "System output tokens/s against the median time per output token each user sees; "
        "labels are concurrency levels. Up and left is better.",
        _png(fig),
    )


def _per_block(details: dict[str, Any]) -> tuple[list[int], list[float], str]:
    blocks = details.get("kl_per_block")
    if isinstance(blocks, list) and blocks:
        if isinstance(blocks[0], dict):
            pairs = [
                (int(b.get("block", b.get("index", i))), float(b.get("kl", b.get("value", 0.0))))
                for i, b in enumerate(blocks)
            ]
        else:
            pairs = list(enumerate(float(v) for v in blocks))
        return [p[0] for p in pairs], [p[1] for p in pairs], "KL (nats)"
    ranking = (
        (details.get("localization") or {}).get("ranking")
        if isinstance(details.get("localization"), dict)
        else None
    )
    if ranking:
        pairs = sorted(
            (int(p["index"]), float(p["error"])) for p in ranking if p.get("index") is not None
        )
        return [p[0] for p in pairs], [p[1] for p in pairs], "relative error vs golden"
    return [], [], ""


def verify_plots(records: list[RunRecord]) -> list[Plot]:
    verify = [r for r in records if r.kind is RecordKind.VERIFY]
    plots = []
    positional = [(r, r.details.get("kl_per_position")) for r in verify]
    positional = [(r, v) for r, v in positional if isinstance(v, list) and v]
    if positional:
        plt = _figure()
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for record, values in positional:
            ax.plot(
                range(len(values)),
                [float(v) for v in values],
                label=f"{record.artifact.kind} ({record.runtime})",
            )
        ax.set(xlabel="position", ylabel="KL(golden || artifact), nats", title="KL per position")
        ax.set_yscale("symlog", linthresh=1e-4)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        plots.append(
            Plot(
                "KL per position",
                "Mean KL divergence from the BF16 golden at each position.",
                _png(fig),
            )
        )
    blocks = [(r, *_per_block(r.details)) for r in verify]
    blocks = [b for b in blocks if b[1]]
    if blocks:
        plt = _figure()
        fig, ax = plt.subplots(figsize=(8, 3.5))
        width = 0.8 / len(blocks)
        for n, (record, xs, ys, ylabel) in enumerate(blocks):
            ax.bar(
                [x + n * width for x in xs],
                ys,
                width=width,
                label=f"{record.artifact.kind} ({ylabel})",
            )
        ax.set(xlabel="block", ylabel=blocks[0][3], title="Divergence per block")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        plots.append(
            Plot(
                "Divergence per block",
                "Per-block divergence from the golden (verify localization).",
                _png(fig),
            )
        )
    return plots


def build_plots(records: list[RunRecord]) -> list[Plot]:
    series = bench_series(records)
    plots = []
    if series:
        plots += [
            throughput_plot(series),
            latency_percentiles_plot(series),
            throughput_latency_plot(series),
        ]
    return plots + verify_plots(records)


# ---- text ---------------------------------------------------------------------------------------
def bench_table(records: list[RunRecord]) -> tuple[list[str], list[list[str]]]:
    header = ["artifact", "runtime", "workload"] + [
        f"{k} ({definition_of(k).unit})" for k in TABLE_METRICS
    ]
    rows = []
    for points in bench_series(records).values():
        for r in points:
            row = [f"{r.artifact.kind} {r.model}", r.runtime, str(r.settings.get("workload", ""))]
            for key in TABLE_METRICS:
                m = r.metrics.get(key)
                row.append(
                    "-"
                    if m is None
                    else f"{m.value:.4g}" + (f" ±{m.spread / 2:.2g}" if m.spread else "")
                )
            rows.append(row)
    return header, rows


def verify_table(records: list[RunRecord]) -> tuple[list[str], list[list[str]]]:
    verify = [r for r in records if r.kind is RecordKind.VERIFY]
    names = sorted({k for r in verify for k in r.metrics})
    rows = [
        [f"{r.artifact.kind} {r.model}", r.runtime, str(r.verdict)]
        + [f"{r.metrics[n].value:.4g}" if n in r.metrics else "-" for n in names]
        for r in verify
    ]
    return ["artifact", "runtime", "verdict", *names], rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def definitions(records: list[RunRecord]) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for r in records:
        for key, metric in r.metrics.items():
            seen.setdefault(key, metric.definition)
    return sorted(seen.items())


def render_markdown(
    records: list[RunRecord], plots: list[Plot], title: str, png_names: list[str]
) -> str:
    parts = [f"# {title}", "", f"{len(records)} run records."]
    header, rows = bench_table(records)
    if rows:
        parts += [
            "",
            "## Bench",
            "",
            "Values: medians over repeats (± half the spread).",
            "",
            markdown_table(header, rows),
        ]
    vh, vrows = verify_table(records)
    if vrows:
        parts += ["", "## Verify", "", markdown_table(vh, vrows)]
    for plot, name in zip(plots, png_names, strict=True):
        parts += ["", f"## {plot.title}", "", plot.description, "", f"![{plot.title}]({name})"]
    parts += ["", "## Definitions", ""] + [f"- `{k}`: {d}" for k, d in definitions(records)]
    return "\n".join(parts) + "\n"


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
.wide{overflow-x:auto}table{border-collapse:collapse;font-size:12px;margin:1em 0}
td,th{border:1px solid #bbb;padding:3px 6px}
th{background:#e8eef7}img{max-width:100%;border:1px solid #ddd}.defs{font-size:12px}"""


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<div class='wide'><table><tr>{head}</tr>{body}</table></div>"


def render_html(
    records: list[RunRecord], plots: list[Plot], title: str, extra_markdown: str = ""
) -> str:
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
        f"<p>{len(records)} run records.</p>",
    ]
    header, rows = bench_table(records)
    if rows:
        parts += [
            "<h2>Bench</h2><p>Values: medians over repeats (± half the spread).</p>",
            _html_table(header, rows),
        ]
    vh, vrows = verify_table(records)
    if vrows:
        parts += ["<h2>Verify</h2>", _html_table(vh, vrows)]
    if extra_markdown:
        parts += [f"<h2>Comparison</h2><pre>{html.escape(extra_markdown)}</pre>"]
    for plot in plots:
        data = base64.b64encode(plot.png).decode()
        parts += [
            f"<h2>{html.escape(plot.title)}</h2><p>{html.escape(plot.description)}</p>",
            f"<img alt='{html.escape(plot.title)}' src='data:image/png;base64,{data}'>",
        ]
    parts += ["<h2>Definitions</h2><ul class='defs'>"]
    parts += [
        f"<li><code>{html.escape(k)}</code>: {html.escape(d)}</li>" for k, d in definitions(records)
    ]
    parts += ["</ul></body></html>"]
    return "\n".join(parts)


def write_report(
    records: list[RunRecord],
    out_dir: str | Path,
    title: str = "builder run report",
    extra_markdown: str = "",
) -> dict[str, Path]:
    """Writes OUT/report.md (+ its PNGs) and OUT/report.html (self-contained); returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = build_plots(records)
    names = [f"report-{n}.png" for n in range(len(plots))]
    for plot, name in zip(plots, names, strict=True):
        (out / name).write_bytes(plot.png)
    markdown = render_markdown(records, plots, title, names)
    if extra_markdown:
        markdown += "\n## Comparison\n\n" + extra_markdown + "\n"
    (out / "report.md").write_text(markdown)
    (out / "report.html").write_text(render_html(records, plots, title, extra_markdown))
    return {"markdown": out / "report.md", "html": out / "report.html"}
