#!/usr/bin/env python
"""FP8 export speed beside `cp` of the same bytes, both exports, measured side by side.

Writes (or reuses) a synthetic Ultra-pattern checkpoint, then, --repeat rounds in
alternating order (A B, B A, ...), each command after deleting its own previous output (on
a VM, writing into pages freed a moment ago is several times cheaper than into pages the
host has to back again, so every command must find the same state):

  TensorRT-LLM FP8 checkpoint at --tp (`write_trtllm_fp8`)   vs  cp -r of its output
  unified HF FP8 checkpoint (`write_unified_hf`)             vs  cp -r of its output

Every timing ends with an fsync of each file the command wrote (not a global `sync`, which
on a shared machine waits for everyone's dirty pages). ModelOpt is imported before the
timings, as `quantize` has it loaded from calibration when it exports. Once, outside the
timed rounds, the TensorRT-LLM export is
also run the previous way (each quantized tensor assembled whole, then divided in fp32:
`quantize_by_division`) and the two outputs must be byte-identical. Amax values are
constants: only speed is measured. The 1-minute load average is printed beside each figure.

With --baseline TREE, each round also times both exports by another checkout's `builder`
(e.g. main's, from before a change; in a child process, imports done before its clock
starts; its HF export with 1 worker, as a tree from before HF export workers has none) in
the same alternating order, and the outputs must be byte-identical. --workers applies to
both exports of this tree.

Usage: python scripts/bench_export.py --work /tmp/export-bench [--size-gb 1] [--tp 8]
       [--workers 1] [--repeat 3] [--warmup 1] [--baseline /work/main] [--skip-trtllm]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from builder.arch import load_plan
from builder.io.checkpoint import HFCheckpoint
from builder.quantize import export_hf, export_trtllm
from builder.quantize.amax import AmaxTable, expected_keys
from builder.quantize.fp8 import quantize_by_division
from builder.synth import SynthSpec, write_synthetic


def constant_table(src: Path) -> AmaxTable:
    plan = load_plan(src)
    table = AmaxTable(kv_cache=True)
    for layer in plan.layers:
        table.update(
            {
                k: 0.05 if k.endswith("weight_quantizer") else 4.0
                for k in expected_keys(plan, layer, True)
            }
        )
    return table


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root`: this command's bytes on disk, not every
    dirty page of the (shared) machine as a global `sync` would wait for."""
    for path in [root, *root.rglob("*")]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def synced(run, out: Path) -> float:
    os.sync()
    start = time.perf_counter()
    run()
    fsync_tree(out)
    return time.perf_counter() - start


def export_trt(src: Path, out: Path, table: AmaxTable, tp: int, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    return synced(
        lambda: export_trtllm.write_trtllm_fp8(src, out, table, tp=tp, workers=workers), out
    )


def export_unified(src: Path, out: Path, table: AmaxTable, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    plan, ckpt = load_plan(src), HFCheckpoint(src)
    # a tree from before export workers (--hf-baseline) has no such parameter
    options = {"workers": workers} if workers > 1 else {}

    def run() -> None:
        out.mkdir(parents=True)
        export_hf.write_unified_hf(out, plan, ckpt, table, **options)

    return synced(run, out)


def export_in(tree: Path, args: argparse.Namespace, kind: str, out: Path) -> float:
    """`export_trt` or `export_unified` timed the same way by `builder` from source tree
    `tree`, in a child process (its imports, ModelOpt's included, happen before its clock
    starts)."""
    command = [sys.executable, __file__, "--work", str(args.work), "--tp", str(args.tp)]
    command += ["--workers", str(args.workers), "--time-into", kind, str(out)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def timed_cp(src: Path, dst: Path) -> float:
    shutil.rmtree(dst, ignore_errors=True)
    return synced(lambda: subprocess.run(["cp", "-r", str(src), str(dst)], check=True), dst)


def previous_trt(src: Path, out: Path, table: AmaxTable, tp: int, workers: int) -> float:
    """The export before streaming: whole tensors, fp32 division (workers=1: patched here)."""
    blockwise, quantize = export_trtllm.Fp8Transform.blockwise, export_trtllm.quantize_trtllm
    export_trtllm.Fp8Transform.blockwise = lambda self, item, dtype: None
    export_trtllm.quantize_trtllm = lambda weight, scale: quantize_by_division(weight, scale)
    try:
        return export_trt(src, out, table, tp, 1)
    finally:
        export_trtllm.Fp8Transform.blockwise = blockwise
        export_trtllm.quantize_trtllm = quantize


def same_files(a: Path, b: Path, pattern: str = "rank*.safetensors") -> bool:
    names = sorted(p.name for p in a.glob(pattern))
    return bool(names) and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def size_of(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def side_by_side(
    name: str, export, out: Path, copy: Path, repeat: int, baseline=None, warmup: int = 1
) -> dict:
    """`export` and `cp` of its output (and `baseline`, another export into its own folder,
    if given) in an order reversed every round; ratios are to the same round's cp. `warmup`
    untimed rounds first: whichever command runs first on a fresh VM writes into memory the
    host has never backed and pays for it (seen as a first export at 2-3x the next)."""
    warm = []
    for _ in range(warmup):
        warm.append({"export_s": export(), "cp_s": timed_cp(out, copy)})
        print(
            f"  {name} warm-up (untimed): export {warm[-1]['export_s']:.2f} s, "
            f"cp {warm[-1]['cp_s']:.2f} s",
            flush=True,
        )
    rows = []
    commands = ["export", "cp"] + (["baseline"] if baseline else [])
    for run in range(repeat):
        times = {}
        for what in commands if run % 2 == 0 else commands[::-1]:
            load = os.getloadavg()[0]
            if what == "export":
                times["export"] = (export(), load)
            elif what == "baseline":
                times["baseline"] = (baseline(), load)
            else:
                if not out.exists():  # cp first in round 0 of a B A order: needs the output
                    export()
                times["cp"] = (timed_cp(out, copy), load)
        row = {
            "export_s": times["export"][0],
            "cp_s": times["cp"][0],
            "ratio": times["export"][0] / times["cp"][0],
            "load_export": times["export"][1],
            "load_cp": times["cp"][1],
        }
        line = (
            f"  {name} round {run}: export {times['export'][0]:.2f} s (load "
            f"{times['export'][1]:.1f}), cp {times['cp'][0]:.2f} s (load {times['cp'][1]:.1f}), "
            f"ratio {row['ratio']:.2f}"
        )
        if baseline:
            row["baseline_s"], row["load_baseline"] = times["baseline"]
            row["baseline_ratio"] = row["baseline_s"] / row["cp_s"]
            line += (
                f"; baseline {row['baseline_s']:.2f} s (load {row['load_baseline']:.1f}), "
                f"ratio {row['baseline_ratio']:.2f}"
            )
        rows.append(row)
        print(line, flush=True)
    shutil.rmtree(copy, ignore_errors=True)
    result = {
        "bytes": size_of(out),
        "warmup": warm,
        "rounds": rows,
        "ratio_median": statistics.median(r["ratio"] for r in rows),
        "export_s_median": statistics.median(r["export_s"] for r in rows),
        "cp_s_median": statistics.median(r["cp_s"] for r in rows),
    }
    if baseline:
        result["baseline_s_median"] = statistics.median(r["baseline_s"] for r in rows)
        result["baseline_ratio_median"] = statistics.median(r["baseline_ratio"] for r in rows)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument(
        "--size-gb", type=float, default=1.0, help="synthetic checkpoint size (Ultra layers 14-17)"
    )
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed export + cp rounds before the timed ones"
    )
    parser.add_argument("--skip-previous", action="store_true", help="skip the old-path check")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a builder source tree (e.g. main's checkout) whose exports are timed beside this "
        "one's in every round; outputs must be byte-identical",
    )
    parser.add_argument("--skip-trtllm", action="store_true", help="time the HF export only")
    parser.add_argument("--time-into", nargs=2, help=argparse.SUPPRESS)  # --baseline's child
    args = parser.parse_args()
    src = args.work / "src"
    if not (src / "config.json").exists():
        write_synthetic(
            src,
            SynthSpec(preset="ultra-253b", layers="14-17", target_bytes=int(args.size_gb * 1e9)),
        )
    table = constant_table(src)
    # The HF export's config step uses ModelOpt's sanitizer; `quantize` has ModelOpt loaded
    # from calibration by then, so its import (seconds) is not part of the export here either.
    import modelopt.torch.export.plugins  # noqa: F401

    if args.time_into:  # the child of --baseline, running another tree's builder
        kind, into = args.time_into[0], Path(args.time_into[1])
        if kind == "trtllm":
            seconds = export_trt(src, into, table, args.tp, args.workers)
        else:  # a tree from before HF export workers takes none
            seconds = export_unified(src, into, table, 1)
        print(json.dumps({"seconds": seconds}))
        return

    trt_out, hf_out, copy = args.work / "fp8-trtllm", args.work / "fp8-hf", args.work / "cp"
    result = {"tp": args.tp, "workers": args.workers, "cpus": os.cpu_count()}
    baseline_out = args.work / "fp8-baseline"
    if args.baseline:
        result["baseline_tree"] = str(args.baseline.resolve())

    def baseline(kind: str):
        if not args.baseline:
            return None

        def run() -> float:
            shutil.rmtree(baseline_out, ignore_errors=True)
            return export_in(args.baseline, args, kind, baseline_out)

        return run

    def compare(key: str, out: Path, pattern: str) -> None:
        if args.baseline:
            result[key]["identical_to_baseline"] = same_files(out, baseline_out, pattern)
            shutil.rmtree(baseline_out, ignore_errors=True)

    if not args.skip_trtllm:
        result["trtllm"] = side_by_side(
            "TensorRT-LLM",
            lambda: export_trt(src, trt_out, table, args.tp, args.workers),
            trt_out,
            copy,
            args.repeat,
            baseline("trtllm"),
            warmup=args.warmup,
        )
        compare("trtllm", trt_out, "rank*.safetensors")
    result["hf"] = side_by_side(
        "unified HF",
        lambda: export_unified(src, hf_out, table, args.workers),
        hf_out,
        copy,
        args.repeat,
        baseline("hf"),
        warmup=args.warmup,
    )
    compare("hf", hf_out, "*")
    if not args.skip_previous and not args.skip_trtllm:
        previous = args.work / "fp8-previous"
        load = os.getloadavg()[0]
        seconds = previous_trt(src, previous, table, args.tp, args.workers)
        result["trtllm_previous_path"] = {
            "export_s": seconds,
            "load": load,
            "ratio_to_cp_median": seconds / result["trtllm"]["cp_s_median"],
            "identical_outputs": same_files(trt_out, previous),
        }
        shutil.rmtree(previous, ignore_errors=True)
    (args.work / "bench_export.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"| export (tp {args.tp}, {args.workers} worker(s)) | MB | export s | cp s | / cp |")
    print("|---|---|---|---|---|")
    for key, name in (("trtllm", "TensorRT-LLM FP8"), ("hf", "unified HF FP8")):
        if key not in result:
            continue
        r = result[key]
        print(
            f"| {name} | {r['bytes'] / 1e6:,.0f} | {r['export_s_median']:.2f} | "
            f"{r['cp_s_median']:.2f} | {r['ratio_median']:.2f} |"
        )
    for key, name in (("trtllm", "TensorRT-LLM FP8"), ("hf", "unified HF FP8")):
        if args.baseline and key in result:
            r = result[key]
            workers = args.workers if key == "trtllm" else 1
            print(
                f"| {name}, baseline {args.baseline} ({workers} worker(s)) | | "
                f"{r['baseline_s_median']:.2f} | | {r['baseline_ratio_median']:.2f} |"
            )
    for key in ("trtllm", "hf"):
        if args.baseline and key in result:
            print(f"{key}: baseline byte-identical: {result[key]['identical_to_baseline']}")
    if "trtllm_previous_path" in result:
        r = result["trtllm_previous_path"]
        print(
            f"| TensorRT-LLM FP8, previous path (whole tensors, fp32 division) | | "
            f"{r['export_s']:.2f} | | {r['ratio_to_cp_median']:.2f} |"
        )
        print(f"previous path byte-identical to the streamed export: {r['identical_outputs']}")


if __name__ == "__main__":
    main()
