#!/usr/bin/env python
"""The Pareto curve of `builder quantize --recipe auto` at several BF16 caps from one
sensitivity measurement.

A `--recipe auto` run records its whole sensitivity in OUT/manifest.json; the assignment
for another cap is the greedy upgrade path (builder.verify.auto.upgrade_path) on those same
numbers, so only the export differs. For each cap this takes the path's last step within
the cap (the most accurate assignment allowed; what auto picks when the KL budget is out of
reach) and runs `builder quantize --recipe FILE` with the auto run's rounding and
calibration: the same calibration data and, under GPTQ, the same codes (deterministic) as
an auto run at that cap would export. Then scripts/score_export.py scores every output.

  nice .venv/bin/python scripts/gptq_pareto.py --auto OUT --src SMOLLM2 --work DIR \\
      [--fractions 0.1,0.3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def sensitivity_of(record: dict):
    from builder.quantize.formats import Recipe
    from builder.verify.sensitivity import Sensitivity, StreamScore

    sens = record["sensitivity"]
    out = Sensitivity(sens["granularity"], sens["windows"], sens["seq_len"])
    out.kl, out.top1 = sens["kl"], sens["top1"]
    out.floor = {int(k): v for k, v in sens["floor"].items()}
    out.base = {
        f: StreamScore(v["name"], Recipe.from_json(v["recipe"]), v["kl"], v["kl_p99"], v["top1"])
        for f, v in sens["uniform"].items()
    }
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--auto", type=Path, required=True, help="a --recipe auto output directory")
    p.add_argument("--src", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--fractions", default="0.1,0.3")
    p.add_argument(
        "--formats",
        help="only these of the measured FP8 formats (comma-separated, e.g. fp8-pc-pt)",
    )
    p.add_argument("--json", type=Path, help="score rows (scripts/score_export.py --json)")
    args = p.parse_args()
    from builder.arch import load_plan
    from builder.verify.auto import upgrade_path

    manifest = json.loads((args.auto / "manifest.json").read_text())
    quant = manifest["quantization"]
    record, rounding = quant["auto"], quant["rounding"]
    calib = manifest["calibration"]
    plan = load_plan(args.src)
    sens = sensitivity_of(record)
    if args.formats:
        keep = set(args.formats.split(","))
        sens.kl = {k: {f: v for f, v in fs.items() if f in keep} for k, fs in sens.kl.items()}
        sens.base = {f: v for f, v in sens.base.items() if f in keep}
    tp = record["options"]["tp"]
    args.work.mkdir(parents=True, exist_ok=True)
    outs = []
    for f in (float(x) for x in args.fractions.split(",")):
        steps, _, _ = upgrade_path(plan, sens, tp, f)
        recipe = steps[-1].recipe
        only = f"-{args.formats.replace(',', '+')}" if args.formats else ""
        name = f"{rounding['method']}-{sens.granularity}{only}-{f:.2f}"
        path = args.work / f"recipe-{name}.json"
        path.write_text(json.dumps(recipe.to_json(), indent=1) + "\n")
        out = args.work / name
        cmd = [sys.executable, "-m", "builder", "quantize", str(args.src), str(out)]
        cmd += ["--format", "hf", "--kv-cache", "none", "--overwrite", "--recipe", str(path)]
        cmd += ["--calib", calib["dataset"], "--seed", str(calib["seed"])]
        cmd += ["--calib-size", str(calib["size"]), "--calib-seq-len", str(calib["seq_len"])]
        cmd += ["--rounding", rounding["method"]]
        if rounding["method"] == "gptq":
            cmd += ["--gptq-damp", str(rounding["damp"])]
        print(f"cap {f:.0%}: BF16 {steps[-1].bf16_fraction:.1%}; {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        outs.append(out)
    score = [sys.executable, str(HERE / "score_export.py"), *map(str, outs), "--src", str(args.src)]
    subprocess.run(score + (["--json", str(args.json)] if args.json else []), check=True)


if __name__ == "__main__":
    main()
