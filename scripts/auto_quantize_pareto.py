#!/usr/bin/env python
"""Pareto table of per-linear FP8/BF16 recipes on SmolLM2: ours (block-streamed sensitivity)
against ModelOpt's `auto_quantize` (whole model resident, gradient scores), side by side.

Both get the same data (calibration windows of the builtin set; ours scores sensitivity on
the first --sens-windows of them, auto_quantize calibrates and scores on all of them) and
the same byte budget: for each BF16 fraction f of the decoder linear weights, ours takes the
cheapest assignment of the greedy path with at most f in BF16, auto_quantize gets the
effective bits of that fraction (8 (1 - f) + 16 f over the decoder linears; lm_head is
excluded from both searches, and ModelOpt counts it at 16 bits, so its bits are weighted in).
Every choice is then scored in one block-streamed pass on the held-out text (`builder
reference`'s wiki windows, disjoint from calibration) against the BF16 reference:
mean KL(BF16 || recipe) over the full vocabulary, p99, top-1 agreement, and the weight bytes
per rank for the target (h100x4-fp8: tp 4; SmolLM2's 9 heads do not split 4 ways, so the
tp=1 bytes are divided evenly).

  nice .venv/bin/python scripts/auto_quantize_pareto.py --work /tmp/pareto \\
      [--fractions 0,0.05,0.1,0.15,0.2,0.3] [--granularity unit] [--formats fp8-pc-pt]

Everything runs on the CPU in bf16; the scores are cached in --work (rerun to reprint).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--src", type=Path, help="HF nemotron-nas checkpoint (default: SmolLM2)")
    p.add_argument("--calib-size", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--sens-windows", type=int, default=8)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--fractions", default="0,0.05,0.1,0.15,0.2,0.25,0.3")
    p.add_argument("--granularity", choices=["block", "unit"], default="unit")
    p.add_argument("--formats", default="fp8-pc-pt", help="ours: comma-separated FP8 formats")
    p.add_argument("--aq-formats", default="fp8,fp8-pc-pt", help="auto_quantize's formats")
    p.add_argument("--aq-method", choices=["gradient", "kl_div"], default="gradient")
    p.add_argument("--target", default="h100x4-fp8")
    p.add_argument("--max-kl", type=float, default=0.015, help="the goal row's budget")
    p.add_argument("--skip-autoquant", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stop-after-sensitivity", action="store_true")
    p.add_argument("--json", action="store_true")
    return p.parse_args()


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def calibrate(src: Path, work: Path, args) -> tuple:
    from builder.quantize.amax import AmaxTable
    from builder.quantize.calib import build_calibration_set, load_tokenizer
    from builder.quantize.pipeline import quantize_checkpoint

    out = work / f"fp8-{args.calib_size}x{args.calib_seq_len}"
    if not (out / "amax.json").is_file():
        say(f"calibrating {args.calib_size} x {args.calib_seq_len} (block by block)")
        quantize_checkpoint(
            src,
            out,
            calib_size=args.calib_size,
            calib_seq_len=args.calib_seq_len,
            kv_cache=False,
            formats="hf",
            overwrite=True,
        )
    data = build_calibration_set(
        "builtin", load_tokenizer(src), args.calib_size, args.calib_seq_len, 0
    )
    return AmaxTable.load(out / "amax.json"), data.windows


def sensitivity(src: Path, work: Path, table, windows, args):
    from builder.quantize.formats import LinearFormat
    from builder.verify.sensitivity import Sensitivity, StreamScore, measure_sensitivity

    formats = tuple(LinearFormat(f) for f in args.formats.split(","))
    path = work / f"sensitivity-{args.granularity}-{args.formats}-{args.sens_windows}-floor.json"
    if path.is_file():
        data = json.loads(path.read_text())
        sens = Sensitivity(
            data["granularity"],
            data["windows"],
            data["seq_len"],
            data["kl"],
            data["top1"],
            seconds=data["seconds"],
        )
        from builder.quantize.formats import Recipe

        sens.floor = {int(k): v for k, v in data.get("floor", {}).items()}
        for f, s in data["uniform"].items():
            sens.base[f] = StreamScore(
                s["name"], Recipe.from_json(s["recipe"]), s["kl"], s["kl_p99"], s["top1"]
            )
        return sens
    say(f"sensitivity: each {args.granularity} alone in {args.formats}, block-streamed")

    def progress(done, total, layer):
        if done % 5 == 0 or done == total:
            say(f"  sensitivity block {done}/{total}")

    sens = measure_sensitivity(
        src, windows[: args.sens_windows], table, formats, args.granularity, progress=progress
    )
    path.write_text(json.dumps(sens.to_json(), indent=1))
    say(f"sensitivity took {sens.seconds:.0f} s")
    return sens


# ---- ModelOpt auto_quantize -------------------------------------------------------------------
AQ_FORMATS = {
    "fp8": "FP8_DEFAULT_CFG",
    "fp8-pc-pt": "FP8_PER_CHANNEL_PER_TOKEN_CFG",
    "w8a16": "INT8_WEIGHT_ONLY_CFG",  # 8 effective bits to auto_quantize, as FP8
}


def autoquant_recipe(src: Path, work: Path, windows, bits: float, args):
    """auto_quantize on the whole resident model; its choice as our Recipe."""
    from builder.model import load_reference_model
    from builder.quantize.recipe import mtq, quiet

    quant = mtq()
    model = load_reference_model(src, dtype=torch.bfloat16)
    batches = [windows[i : i + 4] for i in range(0, windows.shape[0], 4)]

    def forward_step(m, batch):
        return m(batch, use_cache=False).logits

    def loss_func(output, batch):
        logits = output[:, :-1].float()
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
        )

    formats = [getattr(quant, AQ_FORMATS[f]) for f in args.aq_formats.split(",")]
    ckpt = work / f"autoquant-{args.aq_method}-{args.aq_formats}-{windows.shape[0]}.pt"
    kwargs = dict(loss_func=loss_func) if args.aq_method == "gradient" else {}
    with quiet():
        model, state = quant.auto_quantize(
            model,
            constraints={"effective_bits": bits},
            quantization_formats=formats,
            data_loader=batches,
            forward_step=forward_step,
            disabled_layers=["*lm_head*"],
            num_calib_steps=len(batches),
            num_score_steps=len(batches),
            method=args.aq_method,
            checkpoint=str(ckpt),
            **kwargs,
        )
    return recipe_from_model(model)


def recipe_from_model(model):
    """Each unit's format as ModelOpt left the quantizers (disabled: BF16; axis 0: per-channel)."""
    from builder.quantize.formats import LinearFormat, Recipe, model_units

    found = {}
    modules = dict(model.named_modules())
    for unit in model_units(model.plan):
        kinds = set()
        for name in unit.hf_modules:
            wq = getattr(modules[name], "weight_quantizer", None)
            if wq is None or not wq.is_enabled:
                kinds.add(LinearFormat.BF16)
            elif wq.num_bits == 8:  # integer weights: INT8_WEIGHT_ONLY_CFG
                kinds.add(LinearFormat.W8A16)
            elif getattr(wq, "axis", None) == 0:
                kinds.add(LinearFormat.FP8_PC_PT)
            else:
                kinds.add(LinearFormat.FP8)
        if len(kinds) > 1:  # a group ModelOpt did not tie (o vs qkv never mix in one unit)
            kinds = {
                min(
                    kinds,
                    key=lambda k: [
                        LinearFormat.BF16,
                        LinearFormat.W8A16,
                        LinearFormat.FP8_PC_PT,
                        LinearFormat.FP8,
                    ].index(k),
                )
            }
        found[unit.key] = kinds.pop()
    return Recipe(LinearFormat.FP8, {k: v for k, v in found.items() if v is not LinearFormat.FP8})


# ---- the table -----------------------------------------------------------------------------
def main() -> None:
    args = parse()
    torch.manual_seed(0)
    # one thread: on a shared machine two OpenMP threads spend most of each matmul waiting
    torch.set_num_threads(args.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    src = args.src
    if src is None:
        from builder.smollm2 import import_smollm2

        src = work / "smollm2"
        if not src.exists():
            import_smollm2(src)
    from builder.arch import load_plan
    from builder.deploy.profiles import load_profile
    from builder.deploy.recipe_memory import bf16_fraction, decoder_linear_params, rank_bytes
    from builder.quantize.calib import load_tokenizer
    from builder.verify.auto import choose, upgrade_path
    from builder.verify.prompts import heldout_windows
    from builder.verify.sensitivity import score_recipes

    plan = load_plan(src)
    profile = load_profile(args.target)
    tp, pp = profile.parallel.tp, profile.parallel.pp
    table, calib = calibrate(src, work, args)
    sens = sensitivity(src, work, table, calib, args)
    if args.stop_after_sensitivity:
        return
    fractions = [float(f) for f in args.fractions.split(",")]
    recipes = {}
    for f in fractions:
        steps, _, _ = upgrade_path(plan, sens, tp, f)
        recipes[f"ours {f:.2f}"] = steps[-1].recipe
    if not args.skip_autoquant:
        # ModelOpt counts the (excluded, BF16) lm_head in effective bits: the minimum is
        # (8 D + 16 L) / (D + L) with D the decoder linears' and L lm_head's parameters.
        decoder, head = decoder_linear_params(plan), plan.vocab_size * plan.hidden_size
        for f in fractions:
            bits = (decoder * (8 + 8 * f) + 16 * head) / (decoder + head) + 1e-6
            say(f"auto_quantize ({args.aq_method}) at {bits:.2f} effective bits")
            recipes[f"autoq {f:.2f}"] = autoquant_recipe(src, work, calib, bits, args)
    # the auto recipe for the goal's budget (what `builder quantize --recipe auto` picks)
    say(f"--recipe auto --max-kl {args.max_kl} --max-bf16-fraction 0.2 (probes on calibration)")
    choice = choose(src, plan, sens, calib[: args.sens_windows], table, args.max_kl, 0.2, tp, pp)
    recipes["auto (max-kl, 20%)"] = choice.recipe
    (work / "auto-recipe.json").write_text(json.dumps(choice.recipe.to_json(), indent=1))
    for name, recipe in recipes.items():  # reusable: builder quantize --recipe FILE
        slug = name.replace(" ", "-").replace("(", "").replace(")", "").replace(",", "")
        (work / f"recipe-{slug}.json").write_text(json.dumps(recipe.to_json(), indent=1))
    heldout = heldout_windows(load_tokenizer(src), args.windows, args.seq_len)
    say(f"scoring {len(recipes)} recipes on {args.windows} x {args.seq_len} held-out tokens")
    scores = score_recipes(src, recipes, heldout, table)
    rows = []
    for name, recipe in recipes.items():
        s = scores[name]
        rows.append(
            {
                "recipe": name,
                "bf16_fraction": bf16_fraction(plan, recipe),
                "kl": s.kl,
                "kl_p99": s.kl_p99,
                "top1": s.top1,
                "bytes_per_rank": max(rank_bytes(plan, recipe, tp, pp)),
                "formats": sorted(f.value for f in recipe.formats_used(plan)),
            }
        )
    if args.json:
        print(json.dumps({"rows": rows, "auto": choice.to_json()}, indent=1))
        return
    print(
        f"\nheld-out: {args.windows} x {args.seq_len} tokens; calibration {args.calib_size} x "
        f"{args.calib_seq_len}; sensitivity: {args.granularity}, {args.formats}, "
        f"{args.sens_windows} windows; bytes per rank for {args.target} (tp {tp})\n"
    )
    print("| recipe | BF16 fraction | mean KL | p99 KL | top-1 | bytes/rank | formats |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['recipe']} | {r['bf16_fraction']:.1%} | {r['kl']:.4f} | {r['kl_p99']:.3f} | "
            f"{r['top1']:.4f} | {r['bytes_per_rank']:,} | {', '.join(r['formats'])} |"
        )
    bf16 = [k for k, v in choice.recipe.overrides.items() if v.value == "bf16"]
    print(f"\nauto choice: BF16 units {', '.join(bf16)}; recipe in {work / 'auto-recipe.json'}")
    print("auto choice (probes on calibration windows):")
    for p in choice.probes:
        print(
            f"  step {p['step']}: BF16 {p['bf16_fraction']:.1%}, predicted {p['predicted_kl']:.4f}"
            f", measured {p['kl']:.4f}, top-1 {p['top1']:.4f}"
        )


if __name__ == "__main__":
    main()
