"""`builder demo`: the whole pipeline on small built-in models, step by step.

Each step is a small function over a shared context so the demo reads like the runbook:
synthesize and import test models, show their plans, run the reference model, convert,
quantize, plan the real targets, dry-run the build and verify the FP8 artifact against the
BF16 golden.
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
        table.add_column(col, no_wrap=True)
    for key in ("ultra_synth", "smollm2"):
        t = totals(load_plan(ctx.results[key]))
        c = t["counts"]
        widths = t["ffn_widths"]
        table.add_row(
            key, str(c["layers"]), str(c["attention"]), str(c["empty"]),
            ",".join(map(str, t["kv_heads"])), f"{min(widths)}..{max(widths)}", f"{t['params'] / 1e6:,.1f} M",
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


def step_convert(ctx: DemoContext) -> None:
    from builder.convert import convert_checkpoint
    from builder.runtime import compare_with_reference

    src, out = ctx.results["ultra_synth"], ctx.path("ultra-trtllm-tp2")
    summary = convert_checkpoint(src, out, tp=2, overwrite=True, progress=False)
    check = compare_with_reference(out, src, prompt=DEMO_PROMPT)
    ctx.results["convert"] = {"summary": summary.to_json(), "executor": check.to_json()}
    ctx.console.print(
        f"TensorRT-LLM checkpoint {out} (tp=2, {len(summary.ranks)} rank files); executor vs "
        f"reference model, fp32: relative error {check.relative_error:.2e}, "
        f"top-1 agreement {check.argmax_agreement:.0%}"
    )
    if check.relative_error > 1e-5:
        raise RuntimeError(f"executor disagrees with the reference model: {check.relative_error:.2e}")


def step_quantize(ctx: DemoContext) -> None:
    from builder.quantize import quantize_checkpoint

    # fp32 calibration of small models is several times faster than bf16 on CPUs without
    # native bf16 matmuls; the exported tensors are BF16/FP8 either way.
    for key, tp, size in (("ultra_synth", 4, 16), ("smollm2", 1, 16)):
        out = ctx.path(f"{key}-fp8")
        summary = quantize_checkpoint(
            ctx.results[key], out, tp=tp, calib_size=size, calib_seq_len=128,
            dtype="float32", overwrite=True,
        )
        ctx.results[f"{key}_fp8"] = out
        ctx.console.print(f"FP8 {key}: {out}/trtllm (tp={tp}) and {out}/hf; "
                          f"{summary.seconds['total']:.1f} s")


def step_accuracy(ctx: DemoContext) -> None:
    import torch

    from builder.quantize import evaluate_accuracy, format_table

    report = evaluate_accuracy(
        ctx.results["smollm2"], ctx.results["smollm2_fp8"], windows=4, seq_len=128,
        dtype=torch.float32, thresholds="smollm2-ci",
    )
    ctx.results["accuracy"] = report.to_json()
    ctx.console.print(format_table(report))


def step_plan_targets(ctx: DemoContext) -> None:
    from builder.build import mission_plans, render_plan

    plans = mission_plans("ultra-253b")
    ctx.results["plans"] = [plan.to_dict() for plan in plans]
    for plan in plans:
        ctx.console.print(render_plan(plan))


def step_dry_run_build(ctx: DemoContext) -> None:
    from builder.build import dry_run_build, load_profile

    ckpt = ctx.results["ultra_synth_fp8"] / "trtllm"
    result = dry_run_build(ckpt, load_profile("h100x4-fp8"), ctx.path("engine-h100x4-fp8"))
    ctx.results["build"] = result.report
    ctx.console.print(f"dry-run build of {ckpt} for h100x4-fp8 -> {result.out}")
    ctx.console.print("  " + result.report["command_line"])
    ctx.console.print("  no engine was built: trtllm-build needs TensorRT-LLM <= 1.2.x on a GPU host")


def step_verify(ctx: DemoContext) -> None:
    import torch

    from builder.verify.golden import GoldenSettings, build_golden
    from builder.verify.run import VerifyOptions, verify
    from builder.verify.runtimes import RuntimeArgs, make_runtime

    # Small windows: one held-out Wikipedia window and one chat prompt with reasoning on and off.
    settings = GoldenSettings(windows=1, seq_len=48, chat_prompts=1, continuation=3, probe_len=16, dtype="float32")
    golden = build_golden(ctx.results["smollm2"], ctx.path("smollm2-golden"), settings, overwrite=True)
    runtime = make_runtime("executor", RuntimeArgs(artifact=str(ctx.results["smollm2_fp8"] / "trtllm"), dtype=torch.float32))
    result = verify(golden, runtime, VerifyOptions(report=ctx.path("verify-report")))
    runtime.close()
    ctx.results["verify"] = {"verdict": str(result.record.verdict), "metrics": result.metrics,
                             "record": str(result.record_path)}
    ctx.console.print(result.table, markup=False)
    if result.exit_code != 0:
        raise RuntimeError("FP8 SmolLM2 fails verify against its BF16 golden: " + "; ".join(result.failures))


STEPS: list[tuple[str, Step]] = [
    ("synthesize a small Ultra-pattern checkpoint", step_synthesize),
    ("import the real SmolLM2-135M", step_import_smollm2),
    ("per-layer plans", step_show_plans),
    ("reference model, reasoning off", step_reference_generation),
    ("convert to TensorRT-LLM tp=2 and check with the executor", step_convert),
    ("FP8 calibration with ModelOpt, both exports", step_quantize),
    ("FP8 accuracy on real SmolLM2 weights", step_accuracy),
    ("plan the real Ultra for the three mission targets", step_plan_targets),
    ("dry-run engine build of the FP8 demo artifact", step_dry_run_build),
    ("verify FP8 SmolLM2 against its BF16 golden", step_verify),
]


def run_demo(workdir: Path, console: Console | None = None) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the demo prints its own step headers and timings
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
