#!/usr/bin/env python
"""FP8 TensorRT-LLM export speed beside `cp` of the same bytes, before and after the table
quantizer, in one run.

Writes (or reuses) a synthetic Ultra-pattern checkpoint, then exports its FP8 TensorRT-LLM
checkpoint at --tp twice: with the fp32-division quantizer (`quantize_by_division`, the
previous path) and with the default (`quantize_by_table` for 16-bit weights: the same bits),
checks the two outputs are byte-identical, and times `cp -r` of the exported directory
(followed by `sync`, as the exports are). Amax values are constants: only speed is measured.

Usage: python scripts/bench_export.py --work /tmp/export-bench [--size-gb 2] [--tp 8] [--workers 1]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import subprocess
import time
from pathlib import Path

from builder.arch import load_plan
from builder.quantize import export_trtllm
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


def timed_export(src: Path, out: Path, table: AmaxTable, tp: int, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    export_trtllm.write_trtllm_fp8(src, out, table, tp=tp, workers=workers)
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - start


def timed_cp(src: Path, dst: Path) -> float:
    shutil.rmtree(dst, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - start


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("rank*.safetensors"))
    return bool(names) and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


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
    args = parser.parse_args()
    src = args.work / "src"
    if not (src / "config.json").exists():
        write_synthetic(
            src,
            SynthSpec(preset="ultra-253b", layers="14-17", target_bytes=int(args.size_gb * 1e9)),
        )
    table = constant_table(src)
    fast = timed_export(src, args.work / "fp8-table", table, args.tp, args.workers)
    default = export_trtllm.quantize_trtllm
    export_trtllm.quantize_trtllm = lambda weight, scale: quantize_by_division(weight, scale)
    try:
        slow = timed_export(src, args.work / "fp8-division", table, args.tp, args.workers)
    finally:
        export_trtllm.quantize_trtllm = default
    cp = timed_cp(args.work / "fp8-table", args.work / "cp")
    nbytes = sum(p.stat().st_size for p in (args.work / "fp8-table").rglob("*") if p.is_file())
    result = {
        "bytes": nbytes,
        "tp": args.tp,
        "workers": args.workers,
        "cp_s": cp,
        "export_division_s": slow,
        "export_table_s": fast,
        "ratio_division_vs_cp": slow / cp,
        "ratio_table_vs_cp": fast / cp,
        "identical_outputs": same_files(args.work / "fp8-table", args.work / "fp8-division"),
    }
    (args.work / "bench_export.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(
        f"| export of {nbytes / 1e6:,.0f} MB at tp {args.tp} | seconds | MB/s | / cp "
        "|\n|---|---|---|---|"
    )
    for name, seconds in (
        ("cp -r", cp),
        ("FP8 export, fp32 division", slow),
        ("FP8 export, table", fast),
    ):
        print(f"| {name} | {seconds:.1f} | {nbytes / seconds / 1e6:,.0f} | {seconds / cp:.2f} |")


if __name__ == "__main__":
    main()
