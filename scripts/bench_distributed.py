#!/usr/bin/env python
"""Data-parallel calibration and tensor-parallel decode over real collectives, side by side.

One run, on the CPU (gloo) or on a GPU host (NCCL, one GPU a process; NVLink multicast kept
off in every process: builder.runtime.distributed.NO_MULTICAST_ENV):

  calibration  `builder quantize` of a synthetic slice of Ultra's block pattern, once in one
               process and once under torchrun with --nproc processes (each calibrates its
               share of the batches, amax MAX-all-reduced, rank 0 writes). Prints both
               calibration times and whether amax.json is bit-identical.
  decode       the same slice converted at TP1 and at TP --nproc. TP1: the executor in one
               process; TP N: DistributedExecutor, one rank file a process, all-reduce and
               all-gather by the collective. Greedy prefill + --steps decode steps, weights
               held (as an engine holds them); median step time of each, their ratio, and
               the logits of TP N against the one-process executor on the same TP N
               checkpoint (bit-identical expected at TP2) and against TP1 (another
               summation split: a rounding-level difference).

On the CPU the processes share the machine's cores: one process uses all of them, N
processes get cores / N threads each, so a speedup measures how well the work splits, not
what GPUs would do; the load average before and after is recorded (a shared machine).

  python scripts/bench_distributed.py --device cpu --json results/distributed-cpu.json
  python scripts/bench_distributed.py --device cuda --nproc 2 --hidden 8192 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from builder.runtime.distributed import (  # noqa: E402
    NO_MULTICAST_ENV,
    UNIT_ROUNDOFF,
    decode,
    keep_multicast_off,
    launch_local,
    load_run,
    tp_decode_worker,
)

LAYERS = "0-1,9-10,42-44"  # Ultra's pattern: GQA + MLP, an empty block, FFN-only blocks


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads))
    env.update(NO_MULTICAST_ENV)
    return env


def calib_text(path: Path) -> Path:
    words = "the model reads long documents and answers questions about numbers like".split()
    paragraphs = [
        " ".join(words[(n + k) % len(words)] for k in range(60)) + f" {n * 7919 % 10007}."
        for n in range(400)
    ]
    path.write_text("\n\n".join(paragraphs))
    return path


def quantize(launcher: list[str], src: Path, out: Path, args, threads: int) -> dict:
    command = [
        *launcher,
        "-m",
        "builder",
        "quantize",
        str(src),
        str(out),
        "--device",
        args.device,
        "--calib",
        str(args.calib),
        "--calib-size",
        str(args.calib_size),
        "--calib-seq-len",
        str(args.calib_seq_len),
        "--batch-size",
        str(args.batch_size),
        "--format",
        "hf",
        "--json",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, env=child_env(threads), capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr[-4000:]}")
    summary = json.loads(done.stdout)
    return {
        "command": " ".join(command),
        "threads_per_process": threads,
        "wall_seconds": round(wall, 2),
        "calibration_seconds": summary["seconds"]["calibration"],
        "weights": summary["blocks"].get("weights"),
        "peak_rss_bytes_rank0": summary["peak_rss_bytes"],
        "peak_gpu_bytes_rank0": summary["peak_gpu_bytes"],
    }


def bench_calibration(args, src: Path, work: Path, cores: int) -> dict:
    one = quantize([sys.executable], src, work / "q1", args, cores)
    # on a busy CPU, one process with all cores can lose to itself with one thread (OpenMP
    # barriers): both are measured, and the speedup is taken against the faster
    one_thread = quantize([sys.executable], src, work / "q1t", args, 1) if cores > 1 else one
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    many = quantize(
        [*torchrun, f"--nproc-per-node={args.nproc}"],
        src,
        work / f"q{args.nproc}",
        args,
        max(1, cores // args.nproc) if args.device == "cpu" else cores,
    )
    # JSON floats are written as their shortest round-tripping repr: equal ⇔ the same bits
    amax_one = json.loads((work / "q1" / "amax.json").read_text())["amax"]
    amax_many = json.loads((work / f"q{args.nproc}" / "amax.json").read_text())["amax"]
    one_thread_out = work / ("q1t" if cores > 1 else "q1")
    amax_one_thread = json.loads((one_thread_out / "amax.json").read_text())["amax"]
    differing = [k for k in amax_one if amax_one[k] != amax_many.get(k)]
    best = min(one["calibration_seconds"], one_thread["calibration_seconds"])
    return {
        "one_process": one,
        "one_process_one_thread": one_thread,
        f"{args.nproc}_processes": many,
        "speedup_over_best_one_process": round(best / many["calibration_seconds"], 3),
        "amax_bit_identical": amax_one == amax_many == amax_one_thread,
        "amax_entries": len(amax_one),
        "amax_differing": differing[:10],
    }


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def bench_decode(args, src: Path, work: Path, cores: int) -> dict:
    from builder.arch import load_plan
    from builder.convert import convert_checkpoint
    from builder.runtime import TrtllmCheckpointExecutor

    tp1, tpn = work / "tp1", work / f"tp{args.nproc}"
    convert_checkpoint(src, tp1, 1)
    convert_checkpoint(src, tpn, args.nproc)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(5, 900, (args.isl,), generator=gen).tolist() for _ in range(args.batch)
    ]
    device = "cuda:0" if args.device == "cuda" else "cpu"
    torch.set_num_threads(1)
    with TrtllmCheckpointExecutor(tp1, dtype, device, keep_weights=True) as ex:
        tp1_one_thread = decode(ex, prompts, args.steps)
    torch.set_num_threads(cores)
    with TrtllmCheckpointExecutor(tp1, dtype, device, keep_weights=True) as ex:
        single_tp1 = decode(ex, prompts, args.steps)
    with TrtllmCheckpointExecutor(tpn, dtype, device, keep_weights=True) as ex:
        single_tpn = decode(ex, prompts, args.steps)  # the one-process executor on TP N
    threads = max(1, cores // args.nproc) if args.device == "cpu" else cores
    out = work / "tp-run"
    launch_local(
        args.nproc,
        args.device,
        tp_decode_worker,
        (str(tpn), prompts, args.steps, args.dtype, threads, str(out)),
    )
    distributed = load_run(out)
    n_layers = len(load_plan(src).layers)
    pairs = list(zip(distributed.logits, single_tpn.logits, strict=True))
    return {
        "batch": args.batch,
        "isl": args.isl,
        "steps": args.steps,
        "dtype": args.dtype,
        "tp1_one_process": {
            "threads": cores,
            "median_step_ms": round(single_tp1.median_step_seconds() * 1e3, 3),
        },
        "tp1_one_process_one_thread": {
            "threads": 1,
            "median_step_ms": round(tp1_one_thread.median_step_seconds() * 1e3, 3),
        },
        f"tp{args.nproc}_one_process": {
            "threads": cores,
            "median_step_ms": round(single_tpn.median_step_seconds() * 1e3, 3),
        },
        f"tp{args.nproc}_distributed": {
            "processes": args.nproc,
            "threads_per_process": threads,
            "median_step_ms": round(distributed.median_step_seconds() * 1e3, 3),
        },
        # against the faster TP1 (on a busy CPU two threads can be slower than one)
        "step_ratio_best_tp1_over_distributed": round(
            min(single_tp1.median_step_seconds(), tp1_one_thread.median_step_seconds())
            / distributed.median_step_seconds(),
            3,
        ),
        "logits_vs_one_process_same_checkpoint": {
            "bit_identical": all(torch.equal(a, b) for a, b in pairs),
            "max_abs_diff": max(float((a - b).abs().max()) for a, b in pairs),
        },
        "logits_vs_tp1": {
            "max_relative_error": max(
                relative_error(a, b)
                for a, b in zip(distributed.logits, single_tp1.logits, strict=True)
            ),
            "same_tokens": distributed.tokens == single_tp1.tokens,
            # TP1 and TP N split every GEMM differently: a rounding-level difference bounded
            # to first order by (14 roundings a block x layers + 2) unit roundoffs (as
            # tests/runtime/test_executor.py derives it)
            "first_order_bound": (14 * n_layers + 2) * UNIT_ROUNDOFF[dtype],
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", default=LAYERS)
    parser.add_argument("--calib", type=Path, default=None, help="calibration file (.txt...)")
    parser.add_argument("--calib-size", type=int, default=16)
    parser.add_argument("--calib-seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--batch", type=int, default=1, help="decode batch")
    parser.add_argument("--isl", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--skip", choices=["calibration", "decode"], action="append", default=[])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        raise SystemExit(f"--nproc {args.nproc} needs {args.nproc} GPUs")
    keep_multicast_off()
    cores = len(os.sched_getaffinity(0))
    from builder.synth import SynthSpec, write_synthetic

    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        args.calib = args.calib or calib_text(work / "calib.txt")
        spec = SynthSpec(preset="ultra-253b", hidden=args.hidden, layers=args.layers)
        src = write_synthetic(work / "src", spec)
        result = {
            "device": args.device,
            "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
            "backend": "nccl" if args.device == "cuda" else "gloo",
            "torch": torch.__version__,
            "cores": cores,
            "env": {k: os.environ.get(k) for k in NO_MULTICAST_ENV},
            "model": {"preset": "ultra-253b", "hidden": args.hidden, "layers": args.layers},
            "checkpoint_bytes": sum(f.stat().st_size for f in src.glob("*.safetensors")),
            "load_average_before": os.getloadavg(),
        }
        if "calibration" not in args.skip:
            result["calibration"] = bench_calibration(args, src, work, cores)
        if "decode" not in args.skip:
            result["decode"] = bench_decode(args, src, work, cores)
        result["load_average_after"] = os.getloadavg()
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
