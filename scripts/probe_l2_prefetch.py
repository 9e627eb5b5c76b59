#!/usr/bin/env python
"""Does asking each skinny GEMM's weight rows into L2 before the PDL wait speed up the decode
step? (GPU only.)

Under programmatic dependent launch a skinny GEMM's programs are scheduled while the kernel
before them (an add + RMSNorm, SiLU or attention kernel) still runs; today each reads only its
first weight tile before it waits, so HBM idles through most of those short kernels.
`gemv.L2_PREFETCH` bytes of each row after that tile are asked into L2 by
`cp.async.bulk.prefetch.L2` instead (a hint: nothing waits for it).

scripts/bench_gpu.py's slice at each `--tp`, each precision, batch 1 after a 128-token prompt:
the step with the skinny paths tuned in the step (`ResidentRuntime.tune_decode_linears`) and no
prefetch, against the step with each prefetch size (paths tuned again for it), interleaved
medians; each distinct one-row GEMM alone (triton.testing.do_bench, L2 flushed) with and without
the prefetch; and one product with and without it compared bit for bit.

    PYTHONPATH=$PWD python3 scripts/probe_l2_prefetch.py --out OUT   # writes OUT/l2_prefetch.json
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

from builder.runtime import gemv  # noqa: E402
from builder.runtime.gemv import CHOOSER  # noqa: E402


def alone_us(keys, sizes: list[int], device) -> list[dict]:
    """Each distinct skinny shape of the step alone, on fresh random weights, per prefetch."""
    import triton.testing

    rows = []
    for m, n, k, dtype in sorted(keys, key=str):
        x = torch.randn(m, k, device=device).to(dtype if dtype != torch.int8 else torch.bfloat16)
        w = torch.randn(n, k, device=device)
        w = (w * 100).clamp(-127, 127).to(torch.int8) if dtype == torch.int8 else w.to(dtype)
        scale = torch.ones(n if dtype == torch.int8 else (), device=device)
        out = {}
        reference = None
        for size in [0, *sizes]:
            y = gemv.skinny_gemm(x, w, scale, torch.bfloat16, pdl=True, prefetch=size)
            reference = y if reference is None else reference
            out[size] = {
                "us": 1e3
                * triton.testing.do_bench(
                    lambda s=size, x=x, w=w, c=scale: gemv.skinny_gemm(
                        x, w, c, torch.bfloat16, True, s
                    ),
                    warmup=5,
                    rep=40,
                    return_mode="median",
                ),
                "bit_identical": bool(torch.equal(y, reference)),
            }
        rows.append({"rows": m, "n": n, "k": k, "dtype": str(dtype), "by_prefetch": out})
        bench_gpu.log(
            f"  alone {m}x{n}x{k} {dtype}: "
            + ", ".join(f"{s}: {v['us']:.1f} us" for s, v in out.items())
        )
    return rows


def in_step(rt, sizes: list[int], rounds: int, replays: int) -> list[dict]:
    span = rt.span_for(rt.length)
    rt.drop_graphs()
    gemv.L2_PREFETCH = 0
    base = rt.capture(1, span)
    tuned_base = dict(CHOOSER.overrides)
    results = []
    for size in sizes:
        gemv.L2_PREFETCH = size
        trials = [t.as_json() for t in rt.tune_decode_linears()]
        rt.drop_graphs()
        variant = rt.capture(1, span)
        times: dict[str, list[float]] = {"without": [], "with": []}
        for _ in range(rounds):
            times["without"].append(rt.replay_ms(base, replays))
            times["with"].append(rt.replay_ms(variant, replays))
        med = {key: sorted(v)[len(v) // 2] for key, v in times.items()}
        results.append(
            {
                "prefetch_bytes_per_row": size,
                "step_ms_without": med["without"],
                "step_ms_with": med["with"],
                "saved_us": 1e3 * (med["without"] - med["with"]),
                "triton_kept": [f"{t['n']}x{t['k']}" for t in trials if t["kept"] == "triton"],
                "rounds": times,
            }
        )
        bench_gpu.log(f"  prefetch {size} B/row: {med['without']:.4f} -> {med['with']:.4f} ms")
        del variant
        gemv.L2_PREFETCH = 0
        CHOOSER.overrides.clear()
        CHOOSER.overrides.update(tuned_base)
    rt.drop_graphs()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tp", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--precisions", nargs="+", default=["fp8", "bf16"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--replays", type=int, default=16)
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    args.out.mkdir(parents=True, exist_ok=True)
    plan = bench_gpu.slice_plan(False)
    copy = bench_gpu.copy_bandwidth(device, 4.0)
    result = {"environment": bench_gpu.environment(device), "copy": copy, "tp": []}
    build_args = argparse.Namespace(batches=[1], max_seq=2304, compile=True)
    build_args.compile, _ = bench_gpu.probe_compile(device)
    for tp in args.tp:
        bf16 = bench_gpu.synth_rank(plan, tp, device, seed=tp)
        fp8 = bench_gpu.fp8_rank(plan, tp, bf16)
        cfgs = bench_gpu.configs(plan, tp)
        entry = {"tp": tp}
        for precision in args.precisions:
            rt = bench_gpu.build(
                cfgs[precision], fp8 if precision == "fp8" else bf16, device, build_args
            )
            rt.prefill(torch.randint(0, bench_gpu.VOCAB, (1, 128), device=device))
            t0 = time.perf_counter()
            tuned = [t.as_json() for t in rt.tune_decode_linears()]
            bench_gpu.log(
                f"tp{tp} {precision}: tuned {len(tuned)} shapes in {time.perf_counter() - t0:.1f} s"
            )
            floor_ms = (rt.linear_bytes + rt.kv_bytes_read(1, rt.span_for(rt.length))) / (
                copy["bandwidth_GBps"] * 1e6
            )
            entry[precision] = {
                "floor_ms": floor_ms,
                "tuned_linears": tuned,
                "prefetch": in_step(rt, args.sizes, args.rounds, args.replays),
            }
            CHOOSER.overrides.clear()
            del rt
            torch.cuda.empty_cache()
            result["tp"] = [*[t for t in result["tp"] if t["tp"] != tp], entry]
            (args.out / "l2_prefetch.json").write_text(json.dumps(result, indent=1) + "\n")
        del bf16, fp8
    keys = {k[:4] for k in CHOOSER.times_us if k[0] == 1}
    result["alone"] = alone_us(keys, args.sizes, device)
    (args.out / "l2_prefetch.json").write_text(json.dumps(result, indent=1) + "\n")
    for t in result["tp"]:
        for precision in args.precisions:
            for row in t[precision]["prefetch"]:
                print(
                    f"tp{t['tp']} {precision} prefetch {row['prefetch_bytes_per_row']:>6}: "
                    f"{row['step_ms_without']:.4f} -> {row['step_ms_with']:.4f} ms "
                    f"(floor {t[precision]['floor_ms']:.4f})"
                )


if __name__ == "__main__":
    main()
