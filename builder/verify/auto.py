"""`--recipe auto`: the cheapest per-linear assignment that meets a KL budget.

Inputs: the block-streamed sensitivity (builder.verify.sensitivity: the KL each candidate,
a block or one unit of it, causes alone in each FP8 format) and each candidate's bytes per
rank under the target's parallelism. The search is the multiple-choice knapsack's greedy:

  1. every candidate starts in its cheapest format (per-tensor FP8 when it was measured);
  2. each candidate's options (formats measured, and BF16 at KL 0) form a lower convex hull
     in (cost, KL), the cost being the bytes; its edges are the upgrades, worth (KL saved) /
     (cost added);
  3. the upgrades, best first, give a sequence of assignments of rising cost; an upgrade
     that would put more than --max-bf16-fraction of the decoder linear weights in BF16
     GEMMs is skipped. W8A16 (when offered) is such a GEMM at FP8's bytes: it replaces BF16
     as a candidate's top option and is priced as BF16 in the search (options_of);
  4. single-candidate KLs do not add up exactly (on SmolLM2 their sum is about twice the KL
     of quantizing everything), so the predicted KL of an assignment is alpha x the sum of
     its candidates' KLs, alpha measured on the all-FP8 recipe; the assignments around the
     predicted crossing are then *measured* in one more block-streamed pass, and the
     cheapest whose measured KL meets the budget is chosen.
Every figure the choice rests on is measured on calibration windows, never on the held-out
text the golden scores, so verifying the result against the golden is an honest check.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from builder.arch.formats import LINEAR_REPLACEMENTS
from builder.arch.plan import ModelPlan
from builder.deploy.recipe_memory import (
    decoder_linear_params,
    rank_bytes,
    unit_bytes,
    unit_shapes,
)
from builder.quantize.amax import AmaxTable
from builder.quantize.formats import (
    AutoOptions,
    LinearFormat,
    Recipe,
    Unit,
)
from builder.quantize.rounding import RoundingStore
from builder.verify.sensitivity import Sensitivity, StreamScore, candidates, score_recipes

# Prefix sizes measured around the predicted crossing: the predicted budget scaled by these.
PROBES = (0.5, 0.7, 0.85, 1.0, 1.2, 1.5, 2.0)


# ---- the search -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    fmt: LinearFormat
    kl: float
    bytes: float
    price: float | None = None  # what the search pays for it, where that is not its bytes

    @property
    def cost(self) -> float:
        return self.bytes if self.price is None else self.price


@dataclass(frozen=True)
class Upgrade:
    key: str
    to: Option
    gain: float  # KL saved per byte added


def hull(options: Sequence[Option]) -> list[Option]:
    """Lower convex hull of (cost, KL), cheapest first, KL strictly falling."""
    points = sorted(options, key=lambda o: (o.cost, o.kl))
    kept: list[Option] = []
    for p in points:
        if kept and p.kl >= kept[-1].kl:
            continue  # costs more and is no better
        while len(kept) >= 2 and _turns_wrong(kept[-2], kept[-1], p):
            kept.pop()
        kept.append(p)
    return kept


def _turns_wrong(a: Option, b: Option, c: Option) -> bool:
    # b lies on or above the segment a-c: it never is the best use of bytes
    return (b.kl - a.kl) * (c.cost - a.cost) >= (c.kl - a.kl) * (b.cost - a.cost)


@dataclass
class Step:
    recipe: Recipe
    kl_sum: float  # sum of the candidates' single KLs
    bytes: float
    bf16_fraction: float
    w8a16_fraction: float = 0.0


@dataclass
class AutoChoice:
    recipe: Recipe
    max_kl: float
    max_bf16_fraction: float
    alpha: float
    predicted_kl: float
    measured: StreamScore
    bf16_fraction: float
    rank_bytes: list[int]
    rows: list[dict[str, Any]]
    probes: list[dict[str, Any]] = field(default_factory=list)
    met: bool = True
    w8a16_fraction: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.to_json(),
            "max_kl": self.max_kl,
            "max_bf16_fraction": self.max_bf16_fraction,
            "alpha": self.alpha,
            "predicted_kl": self.predicted_kl,
            "measured_on_calibration": self.measured.to_json() | {"recipe": None},
            "bf16_fraction": self.bf16_fraction,
            "w8a16_fraction": self.w8a16_fraction,
            "rank_bytes": self.rank_bytes,
            "budget_met": self.met,
            "table": self.rows,
            "probes": self.probes,
        }


def options_of(
    plan: ModelPlan, sens: Sensitivity, units: dict[str, list[Unit]], tp: int
) -> dict[str, list[Option]]:
    """Each candidate's hull of formats. W8A16 computes in BF16 at FP8's bytes: where it was
    measured it takes BF16's place as the top option, priced as BF16 (the search spends BF16
    compute on it, the bytes it reports are its own); a linear-replacement block's linear
    is never offered W8A16 (TensorRT-LLM's build cannot quantize it, Recipe.check_trtllm)."""
    out = {}
    for key, us in units.items():
        bf16 = sum(unit_bytes(plan, u, LinearFormat.BF16, tp) for u in us)
        weight_only = LinearFormat.W8A16.value in sens.kl[key] and not any(
            u.name in LINEAR_REPLACEMENTS for u in us
        )
        opts = [
            Option(
                LinearFormat(f),
                sens.own(key, f),
                sum(unit_bytes(plan, u, LinearFormat(f), tp) for u in us),
                bf16 if f == LinearFormat.W8A16.value else None,
            )
            for f in sens.kl[key]
            if f != LinearFormat.W8A16.value or weight_only
        ]
        if not weight_only:
            opts.append(Option(LinearFormat.BF16, 0.0, bf16))
        out[key] = hull(opts)
    return out


def recipe_of(units: dict[str, list[Unit]], chosen: dict[str, LinearFormat]) -> Recipe:
    overrides = {u.key: chosen[k] for k, us in units.items() for u in us}
    default = LinearFormat.FP8
    return Recipe(default, {k: v for k, v in overrides.items() if v is not default})


def upgrade_path(
    plan: ModelPlan, sens: Sensitivity, tp: int, max_bf16_fraction: float
) -> tuple[list[Step], dict[str, list[Unit]], dict[str, list[Option]]]:
    """The greedy sequence of assignments, cheapest first."""
    units = candidates(plan, sens.granularity)
    options = options_of(plan, sens, units, tp)
    chosen = {k: opts[0] for k, opts in options.items()}
    upgrades = []
    for key, opts in options.items():
        for a, b in zip(opts, opts[1:], strict=False):
            upgrades.append(Upgrade(key, b, (a.kl - b.kl) / max(b.cost - a.cost, 1e-9)))
    upgrades.sort(key=lambda u: -u.gain)
    total = decoder_linear_params(plan)
    params = {
        k: sum(math.prod(s) for u in us for s in unit_shapes(plan, u)) for k, us in units.items()
    }

    def step() -> Step:
        recipe = recipe_of(units, {k: o.fmt for k, o in chosen.items()})

        def share(fmt: LinearFormat) -> float:
            return sum(params[k] for k, o in chosen.items() if o.fmt is fmt) / total

        return Step(
            recipe,
            sum(o.kl for o in chosen.values()),
            sum(o.bytes for o in chosen.values()),
            share(LinearFormat.BF16),
            share(LinearFormat.W8A16),
        )

    steps = [step()]
    for up in upgrades:
        current = chosen[up.key]
        if options[up.key].index(current) + 1 != options[up.key].index(up.to):
            continue  # an earlier edge of this candidate was skipped: the hull order broke
        if not up.to.fmt.fp8 and current.fmt.fp8:
            # BF16 and W8A16 GEMMs both run in BF16: --max-bf16-fraction bounds their sum
            last = steps[-1]
            if last.bf16_fraction + last.w8a16_fraction + params[up.key] / total > (
                max_bf16_fraction + 1e-12
            ):
                continue
        chosen[up.key] = up.to
        steps.append(step())
    return steps, units, options


def choose(
    src: str | Path,
    plan: ModelPlan,
    sens: Sensitivity,
    windows: torch.Tensor,
    table: AmaxTable | None,
    max_kl: float,
    max_bf16_fraction: float = 1.0,
    tp: int = 1,
    pp: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
    progress=None,
    rounding: RoundingStore | None = None,
) -> AutoChoice:
    """Search the upgrade path, measure the assignments around the predicted crossing in one
    block-streamed pass, and return the cheapest that meets `max_kl` (or the most accurate
    one measured, with `met` False, when none does)."""
    steps, units, options = upgrade_path(plan, sens, tp, max_bf16_fraction)
    first = steps[0]
    used = first.recipe.formats_used(plan)
    base = sens.base.get(next(iter(used)).value) if len(used) == 1 else None
    alpha = base.kl / first.kl_sum if base is not None and first.kl_sum > 0 else 1.0
    picks = sorted({_crossing(steps, alpha, max_kl * p) for p in PROBES} | {len(steps) - 1})
    recipes = {f"step {i}": steps[i].recipe for i in picks}
    scores = score_recipes(src, recipes, windows, table, dtype, device, progress, rounding=rounding)
    probes = []
    for i in picks:
        s = scores[f"step {i}"]
        probes.append(
            {
                "step": i,
                "bytes": steps[i].bytes,
                "bf16_fraction": steps[i].bf16_fraction,
                "w8a16_fraction": steps[i].w8a16_fraction,
                "predicted_kl": alpha * steps[i].kl_sum,
                "kl": s.kl,
                "top1": s.top1,
            }
        )
    meeting = [i for i in picks if scores[f"step {i}"].kl <= max_kl]
    met = bool(meeting)
    best = min(meeting) if met else min(picks, key=lambda i: scores[f"step {i}"].kl)
    step = steps[best]
    rows = choice_rows(plan, step.recipe, sens, units, tp)
    return AutoChoice(
        recipe=step.recipe,
        max_kl=max_kl,
        max_bf16_fraction=max_bf16_fraction,
        alpha=alpha,
        predicted_kl=alpha * step.kl_sum,
        measured=scores[f"step {best}"],
        bf16_fraction=step.bf16_fraction,
        w8a16_fraction=step.w8a16_fraction,
        rank_bytes=rank_bytes(plan, step.recipe, tp, pp),
        rows=rows,
        probes=probes,
        met=met,
    )


def _crossing(steps: list[Step], alpha: float, budget: float) -> int:
    for i, s in enumerate(steps):
        if alpha * s.kl_sum <= budget:
            return i
    return len(steps) - 1


def choice_rows(
    plan: ModelPlan, recipe: Recipe, sens: Sensitivity, units: dict[str, list[Unit]], tp: int
) -> list[dict[str, Any]]:
    """The chosen table: block, kind, width, format, KL share, bytes per rank."""
    rows = []
    total_kl = 0.0
    for key, us in units.items():
        fmt = recipe.format_of(us[0])
        kl = 0.0 if fmt is LinearFormat.BF16 else sens.own(key, fmt.value)
        total_kl += 0.0 if math.isnan(kl) else kl
        layer = plan.layers[us[0].layer]
        rows.append(
            {
                "candidate": key,
                "block": layer.index,
                "kind": layer.short,
                "width": layer.ffn_width,
                "units": ",".join(u.name for u in us),
                "format": fmt.value,
                "kl_alone": kl,
                "bytes_per_rank": int(sum(unit_bytes(plan, u, fmt, tp) for u in us)),
            }
        )
    for row in rows:
        row["kl_share"] = row["kl_alone"] / total_kl if total_kl > 0 else 0.0
    return rows


def format_choice(choice: AutoChoice) -> str:
    """The chosen table as Markdown."""
    lines = [
        "| candidate | block | kind | width | format | own KL | KL share | bytes/rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in choice.rows:
        lines.append(
            f"| {r['candidate']} | {r['block']} | {r['kind']} | {r['width'] or '-'} | "
            f"{r['format']} | {r['kl_alone']:.5f} | {r['kl_share']:.1%} | "
            f"{r['bytes_per_rank']:,} |"
        )
    m = choice.measured
    lines += [
        "",
        f"budget: mean KL <= {choice.max_kl:g}, BF16 GEMMs <= {choice.max_bf16_fraction:.0%} "
        f"of decoder linear weights; chosen: BF16 {choice.bf16_fraction:.1%}"
        + (f", W8A16 {choice.w8a16_fraction:.1%}" if choice.w8a16_fraction else "")
        + ", measured on "
        f"calibration windows KL {m.kl:.4f} (p99 {m.kl_p99:.3f}), top-1 {m.top1:.4f} "
        f"(predicted {choice.predicted_kl:.4f}, alpha {choice.alpha:.2f}); weights per rank "
        f"{max(choice.rank_bytes):,} bytes"
        + ("" if choice.met else "; BUDGET NOT MET: the most accurate assignment measured"),
    ]
    return "\n".join(lines)


# ---- the pipeline's step ------------------------------------------------------------------
def auto_recipe(
    src: Path,
    plan: ModelPlan,
    table: AmaxTable,
    windows: torch.Tensor,
    opts: AutoOptions,
    dtype: torch.dtype,
    device: str,
    say=lambda m: None,
    rounding: RoundingStore | None = None,
) -> tuple[Recipe, dict[str, Any], str]:
    """Sensitivity, then the choice; returns (recipe, manifest record, Markdown table).

    `rounding`: the stored GPTQ codes of every candidate format; the sensitivity and the
    probes then measure the codes the exports will write (None: nearest rounding)."""
    import time

    from builder.verify.sensitivity import measure_sensitivity

    if not 0 < opts.max_kl:
        raise ValueError("--max-kl must be positive")
    windows = windows[: opts.windows]
    started = time.perf_counter()
    method = "nearest" if rounding is None else "gptq"
    say(
        f"sensitivity: each {opts.granularity} alone in "
        f"{', '.join(f.value for f in opts.formats)} ({method} rounding) on {windows.shape[0]} "
        f"x {windows.shape[1]} calibration tokens, block-streamed"
    )
    sens = measure_sensitivity(
        src, windows, table, opts.formats, opts.granularity, dtype, device, rounding=rounding
    )
    say(f"choosing the cheapest assignment with mean KL <= {opts.max_kl:g}")
    choice = choose(
        src,
        plan,
        sens,
        windows,
        table,
        opts.max_kl,
        opts.max_bf16_fraction,
        opts.tp,
        opts.pp,
        dtype,
        device,
        rounding=rounding,
    )
    record = {
        "options": {
            "max_kl": opts.max_kl,
            "max_bf16_fraction": opts.max_bf16_fraction,
            "granularity": opts.granularity,
            "formats": [f.value for f in opts.formats],
            "windows": int(windows.shape[0]),
            "seq_len": int(windows.shape[1]),
            "target": opts.target,
            "tp": opts.tp,
            "pp": opts.pp,
            "rounding": method,
        },
        "sensitivity": sens.to_json(),
        "choice": choice.to_json(),
        "seconds": round(time.perf_counter() - started, 3),
    }
    return choice.recipe, record, format_choice(choice)


def verify_choice(
    out: Path, golden: Path, dtype: torch.dtype = torch.float32, device: str = "cpu", say=None
) -> dict[str, Any]:
    """`builder verify` of both exports of OUT against the golden; the verdicts and metrics
    go into OUT/manifest.json under quantization.auto.verify."""
    from builder.io.manifest import read_manifest, write_manifest
    from builder.verify.run import VerifyOptions, verify
    from builder.verify.runtimes import RuntimeArgs, make_runtime

    results: dict[str, Any] = {}
    tables = []
    for name, sub in (("executor", "trtllm"), ("hf", "hf")):
        if not (out / sub).is_dir():
            continue
        runtime = make_runtime(name, RuntimeArgs(str(out / sub), dtype=dtype, device=device))
        try:
            result = verify(golden, runtime, VerifyOptions(), say or (lambda m: None))
        finally:
            runtime.close()
        results[name] = {
            "verdict": result.record.verdict.value,
            "metrics": result.metrics,
            "failures": result.failures,
        }
        tables.append(f"{name} ({sub}):\n{result.table}")
    manifest = read_manifest(out)
    manifest.setdefault("quantization", {}).setdefault("auto", {})["verify"] = results
    write_manifest(out, manifest)
    return {"results": results, "table": "\n\n".join(tables)}


def recipe_request(
    recipe: str,
    max_kl: float | None,
    max_bf16_fraction: float | None,
    granularity: str,
    windows: int,
    target: str,
    candidates: str | None = None,
) -> tuple[Recipe | None, AutoOptions | None]:
    """What `builder quantize --recipe ...` asks for: a fixed recipe (a format name or a JSON
    file of {"default": ..., "overrides": {...}}), or the auto search's options (`candidates`:
    the quantized formats it may assign, comma-separated; default fp8 and fp8-pc-pt)."""
    from builder.errors import UserError

    if recipe != "auto":
        if max_kl is not None or max_bf16_fraction is not None or candidates is not None:
            raise UserError(
                "--max-kl, --max-bf16-fraction and --candidates apply to --recipe auto only"
            )
        if recipe in {f.value for f in LinearFormat}:
            return Recipe.uniform(LinearFormat(recipe)), None
        path = Path(recipe)
        if not path.is_file():
            choices = ", ".join(f.value for f in LinearFormat)
            raise UserError(f"--recipe {recipe!r}: not {choices}, auto, or a recipe JSON file")
        return Recipe.load(path), None
    if max_kl is None or max_kl <= 0:
        raise UserError("--recipe auto needs --max-kl X (a positive mean KL budget)")
    fraction = 1.0 if max_bf16_fraction is None else max_bf16_fraction
    if not 0 <= fraction <= 1:
        raise UserError(f"--max-bf16-fraction {fraction}: expected 0 ... 1")
    if windows < 1:
        raise UserError(f"--sensitivity-windows {windows}: expected at least 1")
    from builder.deploy.profiles import load_profile

    profile = load_profile(target)
    formats = AutoOptions.formats
    if candidates is not None:
        names = [c.strip() for c in candidates.split(",") if c.strip()]
        formats = tuple(LinearFormat.parse(c, "--candidates") for c in names)
        if not formats or not all(f.quantized for f in formats):
            raise UserError(
                f"--candidates {candidates!r}: expected quantized formats "
                "(fp8, fp8-pc-pt, w8a16), comma-separated; BF16 is always the top option"
            )
    return None, AutoOptions(
        max_kl=max_kl,
        max_bf16_fraction=fraction,
        formats=formats,
        granularity=granularity,
        windows=windows,
        tp=profile.parallel.tp,
        pp=profile.parallel.pp,
        target=target,
    )
