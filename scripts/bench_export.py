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

Usage: python scripts/bench_export.py --work /tmp/export-bench [--size-gb 1] [--tp 8]
       [--workers 1] [--repeat 2]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import statistics
import subprocess
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


def export_unified(src: Path, out: Path, table: AmaxTable) -> float:
    shutil.rmtree(out, ignore_errors=True)
    plan, ckpt = load_plan(src), HFCheckpoint(src)

    def run() -> None:
        out.mkdir(parents=True)
        export_hf.write_unified_hf(out, plan, ckpt, table)

    return synced(run, out)


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


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("rank*.safetensors"))
    return bool(names) and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def size_of(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def side_by_side(name: str, export, out: Path, copy: Path, repeat: int) -> dict:
    rows = []
    for run in range(repeat):
        times = {}
        for what in ("export", "cp") if run % 2 == 0 else ("cp", "export"):
            load = os.getloadavg()[0]
            if what == "export":
                times["export"] = (export(), load)
            else:
                if not out.exists():  # cp first in round 0 of a B A order: needs the output
                    export()
                times["cp"] = (timed_cp(out, copy), load)
        rows.append(
            {
                "export_s": times["export"][0],
                "cp_s": times["cp"][0],
                "ratio": times["export"][0] / times["cp"][0],
                "load_export": times["export"][1],
                "load_cp": times["cp"][1],
            }
        )
        print(
            f"  {name} round {run}: export {times['export'][0]:.2f} s (load "
            f"{times['export'][1]:.1f}), cp {times['cp'][0]:.2f} s (load {times['cp'][1]:.1f}), "
            f"ratio {rows[-1]['ratio']:.2f}",
            flush=True,
        )
    shutil.rmtree(copy, ignore_errors=True)
    return {
        "bytes": size_of(out),
        "rounds": rows,
        "ratio_median": statistics.median(r["ratio"] for r in rows),
        "export_s_median": statistics.median(r["export_s"] for r in rows),
        "cp_s_median": statistics.median(r["cp_s"] for r in rows),
    }


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
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--skip-previous", action="store_true", help="skip the old-path check")
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

    trt_out, hf_out, copy = args.work / "fp8-trtllm", args.work / "fp8-hf", args.work / "cp"
    result = {"tp": args.tp, "workers": args.workers, "cpus": os.cpu_count()}
    result["trtllm"] = side_by_side(
        "TensorRT-LLM",
        lambda: export_trt(src, trt_out, table, args.tp, args.workers),
        trt_out,
        copy,
        args.repeat,
    )
    result["hf"] = side_by_side(
        "unified HF", lambda: export_unified(src, hf_out, table), hf_out, copy, args.repeat
    )
    if not args.skip_previous:
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
        r = result[key]
        print(
            f"| {name} | {r['bytes'] / 1e6:,.0f} | {r['export_s_median']:.2f} | "
            f"{r['cp_s_median']:.2f} | {r['ratio_median']:.2f} |"
        )
    if "trtllm_previous_path" in result:
        r = result["trtllm_previous_path"]
        print(
            f"| TensorRT-LLM FP8, previous path (whole tensors, fp32 division) | | "
            f"{r['export_s']:.2f} | | {r['ratio_to_cp_median']:.2f} |"
        )
        print(f"previous path byte-identical to the streamed export: {r['identical_outputs']}")


if __name__ == "__main__":
    main()
