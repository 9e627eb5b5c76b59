"""`builder demo`: the whole pipeline on small built-in models, step by step.

Each step is a small function over a shared context so the demo reads like the runbook:
synthesize and import test models, show their plans, run the reference model, convert,
quantize, plan the real targets and dry-run the build.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

DEMO_PROMPT = "What is the capital of France?"


@dataclass
class DemoContext:
    workdir: Path
    console: Console
    results: dict[str, Any] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.workdir / name


Step = Callable[[DemoContext], None]


def step_synthesize(ctx: DemoContext) -> None:
    from builder.synth import SynthSpec, write_synthetic

    out = write_synthetic(ctx.path("ultra-synth"), SynthSpec(preset="ultra-253b"), overwrite=True)
    ctx.results["ultra_synth"] = out
    ctx.console.print(f"synthetic Ultra-pattern checkpoint: {out}")


def step_import_smollm2(ctx: DemoContext) -> None:
    from builder.smollm2 import import_smollm2

    out = import_smollm2(ctx.path("smollm2"), overwrite=True)
    ctx.results["smollm2"] = out
    ctx.console.print(f"SmolLM2-135M as nemotron-nas: {out}")


def step_show_plans(ctx: DemoContext) -> None:
    from builder.arch import load_plan
    from builder.arch.summary import totals

    table = Table(title="Plans")
    for col in ("model", "layers", "attention", "empty", "kv heads", "ffn widths", "params"):
        table.add_column(col)
    for key in ("ultra_synth", "smollm2"):
        t = totals(load_plan(ctx.results[key]))
        c = t["counts"]
        widths = t["ffn_widths"]
        table.add_row(
            key, str(c["layers"]), str(c["attention"]), str(c["empty"]),
            ",".join(map(str, t["kv_heads"])), f"{min(widths)}..{max(widths)}", f"{t['params']:,}",
        )
    ctx.console.print(table)


def step_reference_generation(ctx: DemoContext) -> None:
    from transformers import AutoTokenizer

    from builder.model import generate_text, load_reference_model

    path = ctx.results["smollm2"]
    model = load_reference_model(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    answer = generate_text(model, tokenizer, DEMO_PROMPT, reasoning=False, max_new_tokens=24)
    ctx.results["answer"] = answer
    ctx.console.print(f"[bold]reasoning off[/] > {DEMO_PROMPT}\n  {answer.strip()}")


STEPS: list[tuple[str, Step]] = [
    ("synthesize a small Ultra-pattern checkpoint", step_synthesize),
    ("import the real SmolLM2-135M", step_import_smollm2),
    ("per-layer plans", step_show_plans),
    ("reference model, reasoning off", step_reference_generation),
]


def run_demo(workdir: Path, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = DemoContext(workdir=workdir, console=console)
    timings = Table(title="demo steps")
    timings.add_column("step")
    timings.add_column("seconds", justify="right")
    for number, (title, step) in enumerate(STEPS, start=1):
        console.rule(f"[bold]{number}/{len(STEPS)} {title}")
        start = time.perf_counter()
        step(ctx)
        seconds = time.perf_counter() - start
        timings.add_row(title, f"{seconds:.1f}")
        ctx.results.setdefault("timings", {})[title] = seconds
    console.print(timings)
    return ctx.results
