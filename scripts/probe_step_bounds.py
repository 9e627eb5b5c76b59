#!/usr/bin/env python
"""What the non-GEMM kernels of a decode step cost, measured by leaving them out (GPU only).

scripts/bench_gpu.py's slice at TP8, BF16 and FP8, batch 1 after a 128-token prompt, the skinny
paths tuned in the step (`ResidentRuntime.tune_decode_linears`). Then the captured step again
with one group of elementwise kernels replaced by their first output, held static (so the
graph has no such kernel, the GEMMs read stale but well-formed inputs, and the logits are
meaningless): the add + RMSNorm kernels, the SiLU kernels, the rotary + cache-write and decode
attention kernels, and all of them (the linears alone, with the embedding and lm_head). Each
variant against the unchanged step, interleaved medians. The differences bound what fusing
each group into its neighbours could save; they are not a runtime mode.

    PYTHONPATH=$PWD python3 scripts/probe_step_bounds.py --out OUT   # writes OUT/bounds.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu  # noqa: E402

from builder.runtime.gemv import CHOOSER  # noqa: E402

GROUPS = {
    "add + RMSNorm": ("add_norm", "add_norm_quant"),
    "SiLU": ("silu_mul", "silu_mul_quant"),
    "rotary + cache write, decode attention": ("rope_cache", "decode_attention"),
}


def shapes_of(args) -> tuple:
    return tuple((tuple(a.shape), a.dtype) for a in args if isinstance(a, torch.Tensor))


def held(name: str, real, outputs: dict):
    """`real`, except that after its first call per input shape it returns that first output."""

    def kernel(*args, **kwargs):
        key = (name, shapes_of(args))
        if key not in outputs:
            outputs[key] = real(*args, **kwargs)
        out = outputs[key]
        if name.startswith("add_norm"):  # the residual passes through; the norm is held
            return args[0], out[1]
        return out

    return kernel


def measure(rt, rounds: int, replays: int, retune: bool) -> dict:
    span = rt.span_for(rt.length)
    rt.drop_graphs()
    base = rt.capture(1, span)
    results = {}
    variants = {**GROUPS, "all of them (linears alone)": sum(GROUPS.values(), ())}
    for label, names in variants.items():
        saved = {name: getattr(rt.kernels, name) for name in names}
        outputs: dict = {}
        for name in names:
            if saved[name] is not None:
                setattr(rt.kernels, name, held(name, saved[name], outputs))
        tuned = dict(CHOOSER.overrides)
        flips = []
        if retune:  # the paths chosen for the step without these kernels, from the step's
            # own choices: back-to-back GEMMs under PDL rank their paths differently
            flips = [
                f"{t.key[1]}x{t.key[2]}->{t.kept}"
                for t in rt.tune_decode_linears()
                if t.kept != tuned.get(t.key, t.kept)
            ]
        rt.drop_graphs()
        trial = rt.capture(1, span)
        for name, fn in saved.items():
            setattr(rt.kernels, name, fn)
        CHOOSER.overrides.clear()
        CHOOSER.overrides.update(tuned)
        times: dict[str, list[float]] = {"step": [], "without": []}
        for _ in range(rounds):
            times["step"].append(rt.replay_ms(base, replays))
            times["without"].append(rt.replay_ms(trial, replays))
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        results[label] = {
            "step_ms": med["step"],
            "without_ms": med["without"],
            "saved_us": 1e3 * (med["step"] - med["without"]),
            "distinct_held_outputs": len(outputs),
            "paths_retuned": retune,
            "paths_changed": flips,
        }
        bench_gpu.log(f"  {label}: {med['step']:.4f} -> {med['without']:.4f} ms")
        del trial
    rt.drop_graphs()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--replays", type=int, default=16)
    parser.add_argument(
        "--no-retune",
        dest="retune",
        action="store_false",
        help="keep the full step's GEMM paths in each variant instead of tuning them again",
    )
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    args.out.mkdir(parents=True, exist_ok=True)
    plan = bench_gpu.slice_plan(False)
    copy = bench_gpu.copy_bandwidth(device, 4.0)
    result = {"environment": bench_gpu.environment(device), "tp": args.tp, "copy": copy}
    bf16 = bench_gpu.synth_rank(plan, args.tp, device, seed=args.tp)
    fp8 = bench_gpu.fp8_rank(plan, args.tp, bf16)
    cfgs = bench_gpu.configs(plan, args.tp)
    build_args = argparse.Namespace(batches=[1], max_seq=2304, compile=True)
    build_args.compile, _ = bench_gpu.probe_compile(device)
    for precision, tensors in (("fp8", fp8), ("bf16", bf16)):
        rt = bench_gpu.build(cfgs[precision], tensors, device, build_args)
        rt.prefill(torch.randint(0, bench_gpu.VOCAB, (1, 128), device=device))
        t0 = time.perf_counter()
        tuned = [t.as_json() for t in rt.tune_decode_linears()]
        bench_gpu.log(f"{precision}: tuned {len(tuned)} shapes in {time.perf_counter() - t0:.1f} s")
        floor_ms = (rt.linear_bytes + rt.kv_bytes_read(1, rt.span_for(rt.length))) / (
            copy["bandwidth_GBps"] * 1e6
        )
        result[precision] = {
            "floor_ms": floor_ms,
            "tuned_linears": tuned,
            "bounds": measure(rt, args.rounds, args.replays, args.retune),
        }
        CHOOSER.overrides.clear()
        del rt
        torch.cuda.empty_cache()
        (args.out / "bounds.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({p: result[p]["bounds"] for p in ("fp8", "bf16")}, indent=1))


if __name__ == "__main__":
    main()
