#!/usr/bin/env python
"""Score what `builder quantize` wrote, the way the probes score recipes: mean KL(BF16 ||
export) over the full vocabulary, p99, top-1 agreement on `builder reference`'s held-out
windows, block-streamed against the BF16 source, plus the weight bytes per rank that
`builder plan --recipe` counts for the target.

The quantized linears run the E4M3 codes and scales stored in OUT/hf (the unified HF
export; the TensorRT-LLM export holds the same codes, tests/quantize/test_gptq.py), so the
score is the artifact's, whatever rounding made it; activations as the recipe's format
(per-tensor: OUT/amax.json's input scales; per-channel: per token), KV cache BF16 (as
scripts/smooth_gptq_probe.py and scripts/auto_quantize_pareto.py score).

  nice .venv/bin/python scripts/score_export.py OUT --src SMOLLM2_DIR [--json rows.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


class ExportedCodes:
    """RoundingStore's reading side over a unified HF FP8 export."""

    def __init__(self, hf_dir: Path):
        from builder.io.checkpoint import HFCheckpoint

        self.ckpt = HFCheckpoint(hf_dir)

    def codes(self, module: str, fmt, rows: slice | None = None) -> torch.Tensor:
        return self.ckpt.read(f"{module}.weight", rows=rows)

    def scale(self, module: str, fmt) -> torch.Tensor:
        return self.ckpt.read(f"{module}.weight_scale")


def score(out: Path, src: Path, windows: int, seq_len: int, target: str) -> dict:
    from builder.arch import load_plan
    from builder.deploy.profiles import load_profile
    from builder.deploy.recipe_memory import bf16_fraction, rank_bytes
    from builder.quantize.amax import AmaxTable
    from builder.quantize.calib import load_tokenizer
    from builder.quantize.formats import Recipe
    from builder.verify.prompts import heldout_windows
    from builder.verify.sensitivity import score_recipes

    manifest = json.loads((out / "manifest.json").read_text())
    quant = manifest["quantization"]
    recipe = Recipe.from_json(quant["recipe"])
    table = AmaxTable.load(out / "amax.json")
    plan = load_plan(src)
    profile = load_profile(target)
    heldout = heldout_windows(load_tokenizer(src), windows, seq_len)
    started = time.perf_counter()
    s = score_recipes(
        src, {"export": recipe}, heldout, table, torch.bfloat16, rounding=ExportedCodes(out / "hf")
    )["export"]
    auto = quant.get("auto") or {}
    return {
        "out": str(out),
        "rounding": quant.get("rounding", {}).get("method", "nearest"),
        "granularity": (auto.get("options") or {}).get("granularity"),
        "bf16_fraction": bf16_fraction(plan, recipe),
        "kl": s.kl,
        "kl_p99": s.kl_p99,
        "top1": s.top1,
        "bytes_per_rank": max(rank_bytes(plan, recipe, profile.parallel.tp, profile.parallel.pp)),
        "calibration_kl": ((auto.get("choice") or {}).get("measured_on_calibration") or {}).get(
            "kl"
        ),
        "formats": sorted(f.value for f in recipe.formats_used(plan)),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("out", type=Path, nargs="+", help="builder quantize output directories")
    p.add_argument("--src", type=Path, required=True, help="the BF16 source checkpoint")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--target", default="h100x4-fp8")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = [score(o, args.src, args.windows, args.seq_len, args.target) for o in args.out]
    print(f"\nheld-out {args.windows} x {args.seq_len}; bytes per rank for {args.target}\n")
    print("| export | rounding | BF16 fraction | mean KL | p99 KL | top-1 | bytes/rank |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {Path(r['out']).name} | {r['rounding']} | {r['bf16_fraction']:.1%} | "
            f"{r['kl']:.4f} | {r['kl_p99']:.3f} | {r['top1']:.4f} | {r['bytes_per_rank']:,} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
