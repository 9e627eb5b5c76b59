#!/usr/bin/env python
"""Leave-one-out ("in context") sensitivity for `--recipe auto`, measured before wiring.

`builder quantize --recipe auto` measures each candidate *alone* (it quantized, everything
else BF16) and its knapsack assumes those KLs add up. At <= 20% BF16 about 80% of the
weights are quantized, so what a BF16 upgrade buys is its marginal saving *in context*:

  gain(u) = KL(base) - KL(base with u in BF16)

where `base` quantizes every unit (each in the format the alone-sensitivity choice gave it,
BF16 units of that choice in --bf16-as). One block-streamed pass measures every candidate
(per GEMM unit and per block) at the cost of the alone-sensitivity: a candidate's stream is
the base stream until the candidate's block, so streams share one cached activation per
distinct recipe prefix (score_shared). The knapsack then fills the BF16 cap with the best
gain per parameter. `--refine` measures once more around that choice (each BF16 unit put
back in its format, each quantized unit made BF16) and swaps the pairs that gain (a local
search step).

Everything the choice rests on is measured on the first --windows calibration windows (the
product's default 8); the chosen recipes and the alone choice are then scored on the 16 x
256 held-out windows exactly as scripts/score_export.py scores an export (full-vocabulary
KL in bf16, the stored GPTQ codes, OUT/amax.json's input scales, KV cache BF16): the
stored codes are the ones the HF export writes, so the scores match an exported run's.
`--dtype float32` runs the measuring passes in fp32 (a flip then does not also re-randomise
every later bf16 rounding). Measured on SmolLM2 (docs/quantize-recipes.md, "Leave-one-out"):
a tie with the alone choice at 10/20/30% BF16, not wired into the product.

  nice -n 15 .venv/bin/python scripts/context_sensitivity_probe.py --src SMOLLM2 \\
      --fp8 OUT_FP8 --fp8-pc-pt OUT_PCPT --recipe ALONE_0.20.json --json rows.json \\
      [--dtype float32] [--refine [--around RECIPE]]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

BASE = "base"
REF = "__reference__"


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Exports:
    """The stored codes of each format, read from a uniform export in that format (one
    `builder quantize --recipe FMT --rounding gptq` run per format on one calibration set:
    GPTQ's codes depend on the calibration data only, so they are the codes an auto run on
    that data stores and exports)."""

    def __init__(self, dirs: dict):
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from score_export import ExportedCodes

        self.by_format = {fmt: ExportedCodes(d / "hf") for fmt, d in dirs.items()}

    def codes(self, module, fmt, rows=None):
        return self.by_format[fmt].codes(module, fmt, rows)

    def scale(self, module, fmt):
        return self.by_format[fmt].scale(module, fmt)


# ---- one pass, streams sharing their common prefix --------------------------------------
@torch.no_grad()
def score_shared(src, recipes, windows, table, rounding, dtype=torch.bfloat16, batch=4):
    """score_recipes' scores, but a stream is computed once per distinct prefix of per-block
    variants: candidates that equal `base` before their block share base's activations."""
    from builder.quantize.formats import LinearFormat, Recipe, block_units
    from builder.verify.sensitivity import StreamScore, _finish, _run, _Stream, quantized_block
    from builder.verify.stream import BlockStream

    stream = BlockStream(Path(src), dtype=dtype, device="cpu", keep_blocks=False)
    recipes = dict(recipes) | {REF: Recipe.uniform(LinearFormat.BF16)}
    for r in recipes.values():
        r.validate(stream.plan)
    ids: dict[tuple, int] = {}  # (parent prefix id, variant key) -> prefix id
    member = dict.fromkeys(recipes, -1)
    hidden = {-1: torch.cat([stream.embed(w)[0][None] for w in windows])}
    started = time.perf_counter()
    for layer, block in stream.blocks():
        if block is None:
            continue
        units = block_units(layer)
        variants: dict[tuple, torch.nn.Module] = {}
        new_hidden: dict[int, torch.Tensor] = {}
        for name, r in recipes.items():
            q = {u: f for u in units if (f := r.format_of(u)).quantized}
            vkey = tuple(sorted((u.key, f.value) for u, f in q.items()))
            pid = ids.setdefault((member[name], vkey), len(ids))
            if pid not in new_hidden:
                if vkey not in variants:
                    variants[vkey] = (
                        quantized_block(block, layer, q, table, rounding) if q else block
                    )
                new_hidden[pid] = _run(stream, variants[vkey], hidden[member[name]], batch)
            member[name] = pid
        hidden = new_hidden
        say(
            f"block {layer.index}: {len(hidden)} distinct streams, "
            f"{time.perf_counter() - started:.0f} s"
        )
    head = stream.head_weights()
    ref = hidden[member[REF]]
    ref_logits = [stream.head(ref[i : i + 1], head) for i in range(ref.shape[0])]
    done: dict[int, StreamScore] = {}
    out = {}
    for name, r in recipes.items():
        if name == REF:
            continue
        pid = member[name]
        if pid not in done:
            s = _Stream(StreamScore(name, r), hidden=hidden[pid])
            _finish(s, stream, head, ref, ref_logits)
            done[pid] = s.score
        d = done[pid]
        out[name] = StreamScore(name, r, d.kl, d.kl_p99, d.top1)
    return out


# ---- recipes ------------------------------------------------------------------------------
def base_recipe(plan, alone, bf16_as):
    """Every unit quantized: the alone choice's format, its BF16 units in `bf16_as`."""
    from builder.quantize.formats import LinearFormat, Recipe, model_units

    fmts = {}
    for u in model_units(plan):
        f = alone.format_of(u)
        fmts[u.key] = bf16_as if f is LinearFormat.BF16 else f
    return Recipe(LinearFormat.FP8, {k: f for k, f in fmts.items() if f is not LinearFormat.FP8})


def with_formats(recipe, changes):
    from builder.quantize.formats import Recipe

    over = dict(recipe.overrides) | changes
    return Recipe(recipe.default, {k: f for k, f in over.items() if f is not recipe.default})


def candidate_units(plan, granularity):
    from builder.verify.sensitivity import candidates

    return {k: [u.key for u in us] for k, us in candidates(plan, granularity).items()}


def params_of(plan):
    from builder.deploy.recipe_memory import unit_shapes
    from builder.quantize.formats import model_units

    return {u.key: sum(math.prod(s) for s in unit_shapes(plan, u)) for u in model_units(plan)}


def knapsack(gains, sizes, cap):
    """Greedy: best gain per parameter first, within `cap` parameters (skips what no longer
    fits, so small candidates fill the slack); candidates with no gain stay quantized."""
    chosen, used = [], 0
    for key in sorted(gains, key=lambda k: -gains[k] / sizes[k]):
        if gains[key] <= 0:
            break
        if used + sizes[key] <= cap:
            chosen.append(key)
            used += sizes[key]
    return chosen


def refine_swaps(loss_in, gain_out, sizes, free):
    """One local-search step around a choice: BF16 unit u back to its format costs
    loss_in[u], quantized v to BF16 saves gain_out[v]; swap best pairs while they gain and fit
    (`free`: parameters left under the cap)."""
    outs = sorted(loss_in, key=lambda k: loss_in[k] / sizes[k])
    ins = sorted(gain_out, key=lambda k: -gain_out[k] / sizes[k])
    swaps = []
    for v in ins:
        if gain_out[v] <= 0:
            break
        if sizes[v] <= free:  # fits without giving anything up
            swaps.append((None, v))
            free -= sizes[v]
            continue
        for u in outs:
            if u in {s[0] for s in swaps}:
                continue
            if sizes[v] <= free + sizes[u] and gain_out[v] > loss_in[u]:
                swaps.append((u, v))
                free += sizes[u] - sizes[v]
                break
    return swaps


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--src", type=Path, required=True)
    p.add_argument("--fp8", type=Path, required=True, help="a --recipe fp8 --rounding gptq OUT")
    p.add_argument("--fp8-pc-pt", type=Path, required=True, help="the same, --recipe fp8-pc-pt")
    p.add_argument("--recipe", type=Path, required=True, help="the alone-sensitivity choice")
    p.add_argument("--bf16-as", default="fp8-pc-pt", help="base format of its BF16 units")
    p.add_argument("--caps", default="0.2,0.1,0.3")
    p.add_argument("--windows", type=int, default=8, help="calibration windows measured on")
    p.add_argument("--calib-size", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--refine", action="store_true", help="a local-search pass at the 1st cap")
    p.add_argument(
        "--around",
        type=Path,
        help="refine around this recipe file (e.g. the alone choice) instead of loo-unit-CAP",
    )
    p.add_argument("--extra", type=Path, action="append", default=[], help="recipes to score")
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="compute dtype of the measuring passes (held-out scoring stays bf16): in fp32 a "
        "unit's flip does not also re-randomise every later bf16 rounding",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--reuse", type=Path, help="a previous --json: its pass 1, not measured")
    p.add_argument("--skip-heldout", action="store_true", help="score only the refined recipe")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from builder.arch import load_plan
    from builder.deploy.recipe_memory import decoder_linear_params
    from builder.quantize.amax import AmaxTable
    from builder.quantize.calib import build_calibration_set, load_tokenizer
    from builder.quantize.formats import LinearFormat, Recipe
    from builder.verify.prompts import heldout_windows

    plan = load_plan(args.src)
    dtype = getattr(torch, args.dtype)
    table = AmaxTable.load(args.fp8 / "amax.json")
    rounding = Exports({LinearFormat.FP8: args.fp8, LinearFormat.FP8_PC_PT: args.fp8_pc_pt})
    tok = load_tokenizer(args.src)
    calib = build_calibration_set("builtin", tok, args.calib_size, args.calib_seq_len, 0).windows
    calib = calib[: args.windows]
    alone = Recipe.load(args.recipe)
    base = base_recipe(plan, alone, LinearFormat(args.bf16_as))
    sizes = params_of(plan)
    total = decoder_linear_params(plan)
    caps = [float(c) for c in args.caps.split(",")]
    record: dict = {"meta": vars(args) | {"windows_shape": list(calib.shape)}, "passes": []}

    # pass 1: leave-one-out around the all-quantized base, per unit and per block
    cands = candidate_units(plan, "unit") | candidate_units(plan, "block")
    if args.reuse:
        record = json.loads(args.reuse.read_text())
        record["meta"] = vars(args) | {"windows_shape": list(calib.shape)}
        gains = record["passes"][0]["gain"]
        say(f"pass 1 reused from {args.reuse}")
    else:
        recipes = {BASE: base} | {
            k: with_formats(base, dict.fromkeys(us, LinearFormat.BF16)) for k, us in cands.items()
        }
        say(f"pass 1: {len(recipes)} streams on {tuple(calib.shape)} calibration tokens")
        t0 = time.perf_counter()
        s1 = score_shared(args.src, recipes, calib, table, rounding, dtype)
        kl0 = s1[BASE].kl
        gains = {k: kl0 - s1[k].kl for k in cands}
        record["passes"].append(
            {
                "what": "leave-one-out around base",
                "base_kl": kl0,
                "base_top1": s1[BASE].top1,
                "gain": gains,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        say(f"pass 1 done: base KL {kl0:.5f}, {time.perf_counter() - t0:.0f} s")
    chosen: dict[str, Recipe] = {}
    for gran in ("unit", "block"):
        g = {k: v for k, v in gains.items() if k in candidate_units(plan, gran)}
        sz = {k: sum(sizes[u] for u in us) for k, us in candidate_units(plan, gran).items()}
        for cap in caps:
            picks = knapsack(g, sz, cap * total)
            units = [u for k in picks for u in candidate_units(plan, gran)[k]]
            chosen[f"loo-{gran}-{cap:.2f}"] = with_formats(
                base, dict.fromkeys(units, LinearFormat.BF16)
            )
    heldout = heldout_windows(tok, 16, 256)
    scored = {"alone": alone, "base (0% BF16)": base} | chosen
    scored |= {f"extra {e.name}": Recipe.load(e) for e in args.extra}
    if not args.skip_heldout:
        record["heldout"] = heldout_rows(args.src, plan, scored, heldout, table, rounding)
        args.json.write_text(json.dumps(record, indent=1, default=str) + "\n")
    if args.refine:
        cap = caps[0]
        start = f"loo-unit-{cap:.2f}" if args.around is None else args.around.stem
        r1 = chosen[start] if args.around is None else Recipe.load(args.around)
        bf = [u for u in sizes if r1.overrides.get(u) is LinearFormat.BF16]
        qu = [u for u in sizes if u not in bf]
        back = {u: base.overrides.get(u, base.default) for u in bf}
        flips = {f"in {u}": with_formats(r1, {u: back[u]}) for u in bf}
        flips |= {f"out {u}": with_formats(r1, {u: LinearFormat.BF16}) for u in qu}
        say(f"pass 2 (refine): {len(flips) + 1} streams around {start}")
        t0 = time.perf_counter()
        s2 = score_shared(args.src, {"r1": r1} | flips, calib, table, rounding, dtype)
        k1 = s2["r1"].kl
        loss_in = {u: s2[f"in {u}"].kl - k1 for u in bf}
        gain_out = {u: k1 - s2[f"out {u}"].kl for u in qu}
        free = cap * total - sum(sizes[u] for u in bf)
        swaps = refine_swaps(loss_in, gain_out, sizes, free)
        changes = {}
        for u, v in swaps:
            if u is not None:
                changes[u] = back[u]
            changes[v] = LinearFormat.BF16
        refined = {f"refined {start}": with_formats(r1, changes)}
        record["passes"].append(
            {
                "what": f"refine around {start}",
                "kl": k1,
                "loss_in": loss_in,
                "gain_out": gain_out,
                "swaps": swaps,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        say(f"pass 2 done: {len(swaps)} swaps, {time.perf_counter() - t0:.0f} s")
        rows = heldout_rows(args.src, plan, refined, heldout, table, rounding)
        record["heldout"] = record.get("heldout", []) + rows
        args.json.write_text(json.dumps(record, indent=1, default=str) + "\n")


def heldout_rows(src, plan, scored, heldout, table, rounding):
    """Held-out scores, as scripts/score_export.py scores an export."""
    from builder.deploy.recipe_memory import bf16_fraction

    say(f"held-out scoring of {len(scored)} recipes")
    s = score_shared(src, scored, heldout, table, rounding)
    rows = []
    for name, r in scored.items():
        rows.append(
            {
                "recipe": name,
                "bf16_fraction": bf16_fraction(plan, r),
                "kl": s[name].kl,
                "kl_p99": s[name].kl_p99,
                "top1": s[name].top1,
                "overrides": r.to_json(),
            }
        )
    print("\n| recipe | BF16 | mean KL | p99 KL | top-1 |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['recipe']} | {r['bf16_fraction']:.1%} | {r['kl']:.4f} | "
            f"{r['kl_p99']:.3f} | {r['top1']:.4f} |",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
