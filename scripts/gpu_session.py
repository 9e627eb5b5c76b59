#!/usr/bin/env python
"""What builder checks on a GPU host, in one run that writes JSON (run on the lent H200).

  fp8        per-tensor FP8 GEMMs: our emulation (the executor's CPU path) against real FP8
             tensor cores (torch._scaled_mm) on Ultra's TP8 shapes, plus their speed vs BF16
  realsize   two real-size Ultra blocks (layers 16-17: hidden 16384, 128 heads, 8 KV heads,
             FFN 53248; 6.4 B parameters, 12.8 GB BF16) synthesized, quantized with
             `builder quantize --device cuda --tp 8`, and the FP8 TensorRT-LLM checkpoint
             executed with emulated and tensor-core GEMMs

Usage: python scripts/gpu_session.py fp8 realsize --out $OUT [--work /tmp/gpu]
Results: OUT/gpu_<step>.json; a short table is printed last.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BUILDER = [sys.executable, "-c", "from builder.cli import main; main()"]


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return float((actual.double() - reference.double()).norm() / reference.double().norm())


def cuda_time_ms(fn, repeat: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeat):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def step_fp8(args) -> dict:
    from builder.quantize.fp8 import quantize_trtllm, trtllm_scale
    from builder.runtime.executor import fp8_linear, fp8_linear_tensor_cores

    torch.backends.cuda.matmul.allow_tf32 = False  # the emulation must run in true fp32
    rows = []
    # (M, K, N): decode and prefill rows against Ultra TP8 per-rank weights
    shapes = [
        (1, 16384, 2304),
        (17, 16384, 6656),
        (1024, 16384, 6656),
        (1024, 6656, 16384),
        (512, 16384, 53248),
    ]
    for m, k, n in shapes:
        gen = torch.Generator(device="cuda").manual_seed(m * 7 + n)
        x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
        w = (torch.randn(n, k, device="cuda", generator=gen) * k**-0.5).to(torch.bfloat16)
        w_scale, a_scale = (
            trtllm_scale(float(w.abs().max())).cuda(),
            trtllm_scale(float(x.abs().max())).cuda(),
        )
        wq = quantize_trtllm(w, w_scale)
        emulated = fp8_linear(x, wq, w_scale, a_scale)
        cores = fp8_linear_tensor_cores(x, wq, w_scale, a_scale)
        cpu = (
            fp8_linear(x.cpu(), wq.cpu(), w_scale.cpu(), a_scale.cpu())
            if m * n <= 17 * 6656
            else None
        )
        bf16 = torch.nn.functional.linear(x, w).float()
        row = {
            "shape_mkn": [m, k, n],
            "tensor_cores_vs_emulated_rel": relative_error(cores, emulated),
            "tensor_cores_vs_cpu_emulated_rel": relative_error(cores.cpu(), cpu)
            if cpu is not None
            else None,
            "fp8_vs_bf16_rel": relative_error(cores, bf16),
            "bf16_ms": cuda_time_ms(lambda x=x, w=w: torch.nn.functional.linear(x, w)),
            "fp8_tensor_cores_ms": cuda_time_ms(
                lambda x=x, wq=wq, a=a_scale, s=w_scale: torch._scaled_mm(
                    x.to(torch.float8_e4m3fn),
                    wq.t(),
                    scale_a=a.reshape(()),
                    scale_b=s.reshape(()),
                    out_dtype=torch.bfloat16,
                )
            )
            if m % 16 == 0
            else None,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "gemms": rows}


def run(cmd: list[str], log: Path) -> float:
    started = time.perf_counter()
    with open(log, "w") as handle:
        subprocess.run(cmd, check=True, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    return time.perf_counter() - started


def exports_beside_cp(out: Path, seconds: dict, work: Path) -> dict:
    """`cp -r` of each export's output right after quantize wrote it (neither side fsyncs:
    quantize's export seconds do not include one): export seconds / cp seconds."""
    ratios = {}
    for name in ("trtllm", "hf"):
        copy = work / f"cp-{name}"
        shutil.rmtree(copy, ignore_errors=True)
        started = time.perf_counter()
        subprocess.run(["cp", "-r", str(out / name), str(copy)], check=True)
        cp_s = time.perf_counter() - started
        shutil.rmtree(copy)
        export_s = seconds[f"export_{name}"]
        ratios[name] = {"export_s": export_s, "cp_s": round(cp_s, 3), "ratio": export_s / cp_s}
    return ratios


def step_realsize(args) -> dict:
    from builder.arch import load_plan
    from builder.runtime import compare_logits
    from builder.runtime.executor import TrtllmCheckpointExecutor

    work = Path(args.work)
    src, out = work / "ultra-real-16-17", work / "ultra-real-fp8"
    result: dict = {}
    result["synth_s"] = run(
        [
            *BUILDER,
            "synth",
            str(src),
            "--preset",
            "ultra-253b",
            "--hidden",
            str(args.hidden),
            "--heads",
            str(args.heads),
            "--layers",
            "16-17",
            "--overwrite",
        ],
        Path(args.out) / "synth.log",
    )
    plan = load_plan(src)
    result["params"] = plan.total_params
    result["source_bytes"] = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    result["quantize_s"] = run(
        [
            *BUILDER,
            "quantize",
            str(src),
            str(out),
            "--device",
            args.device,
            "--tp",
            "8",
            "--calib-size",
            str(args.calib_size),
            "--calib-seq-len",
            "512",
            "--batch-size",
            "8",
            "--overwrite",
            "--json",
        ],
        Path(args.out) / "quantize.log",
    )
    manifest = json.loads((out / "manifest.json").read_text())
    result["quantize_manifest"] = {k: v for k, v in manifest.items() if k not in ("files", "amax")}
    result["export_vs_cp"] = exports_beside_cp(out, manifest["run"]["seconds"], work)
    golden = work / "golden"
    result["reference_s"] = run(
        [
            *BUILDER,
            "reference",
            str(src),
            str(golden),
            "--device",
            args.device,
            "--prompts",
            "wiki",
            "--windows",
            "4",
            "--continuation",
            "4",
            "--overwrite",
        ],
        Path(args.out) / "reference.log",
    )
    golden_json = json.loads((golden / "golden.json").read_text())
    result["reference_run"] = golden_json.get("run", golden_json.get("settings"))
    ids = torch.randint(0, plan.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    logits = {}
    for gemm in ("emulate", "tensor-cores") if args.device != "cpu" else ("emulate",):
        with TrtllmCheckpointExecutor(
            out / "trtllm", dtype=torch.bfloat16, device=args.device, fp8_gemm=gemm
        ) as ex:
            started = time.perf_counter()
            logits[gemm] = ex.forward(ids.to(args.device)).float().cpu()
            result[f"executor_{gemm}_s"] = time.perf_counter() - started
    if "tensor-cores" in logits:
        result["executor_tensor_cores_vs_emulated"] = compare_logits(
            logits["tensor-cores"], logits["emulate"], "bfloat16"
        ).to_json()
    return result


STEPS = {"fp8": step_fp8, "realsize": step_realsize}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("steps", nargs="+", choices=sorted(STEPS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default="/tmp/gpu")
    parser.add_argument("--calib-size", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=16384, help="realsize: 16384 is Ultra's")
    parser.add_argument("--heads", type=int, default=128)
    parser.add_argument(
        "--device", default="cuda", help="realsize: cpu for a small local rehearsal"
    )
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    for name in args.steps:
        started = time.perf_counter()
        try:
            result = STEPS[name](args) | {"ok": True}
        except Exception as err:  # noqa: BLE001 (one failed step must not lose the others' results)
            result = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        result["wall_s"] = time.perf_counter() - started
        Path(args.out, f"gpu_{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"== {name}: {json.dumps(result)[:2000]}", flush=True)


if __name__ == "__main__":
    main()
