"""What one skinny FP8 GEMM (one row) costs between other kernels, per path, on a GPU.

For each TP8 / TP4 shape of scripts/bench_gpu.py's slice: up to 20 calls on as many distinct
weight copies (so nothing is served from L2) captured in one CUDA graph, the Triton kernels
launched with programmatic dependent launch; the median of 10 replays over the calls. Paths:
cuBLAS (`torch._scaled_mm`), the skinny kernel (builder/runtime/gemv.py) and a stream-K kernel
defined here (the (output block, K tile) steps cut evenly over 1-8 programs per SM, blocks cut
between programs summed in program order by the last to arrive), in ten configurations. It was
measured on the H200 and dropped (scripts/results/h200_probe_gemm_in_graph_2026-12-02.json).

    PYTHONPATH=$PWD python3 scripts/probe_gemm_in_graph.py   # writes $OUT/probe_gemm.json
"""

import json
import os
import time

import torch
import triton
import triton.language as tl

from builder.runtime import gemv
from builder.runtime.fused import pdl_launch


@triton.jit
def owner(step, total, programs):
    return ((step + 1) * programs - 1) // total


@triton.jit
def nested(
    x_ptr,
    w_ptr,
    scale_ptr,
    y_ptr,
    part_ptr,
    count_ptr,
    M,
    N,
    K,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PER_SM: tl.constexpr,
    GDC: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    k_tiles = tl.cdiv(K, BLOCK_K)
    total = tl.cdiv(N, BLOCK_N) * k_tiles
    start = (pid * total) // programs
    end = ((pid + 1) * total) // programs
    rows = tl.arange(0, 16)
    lanes_n = tl.arange(0, BLOCK_N)
    lanes_k = tl.arange(0, BLOCK_K)
    if GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    scale = tl.load(scale_ptr)
    first_block = start // k_tiles
    last_block = (end - 1) // k_tiles
    tile = rows[:, None] * BLOCK_N + lanes_n[None, :]
    for block in range(first_block, last_block + 1):
        cols = block * BLOCK_N + lanes_n
        w_base = w_ptr + cols.to(tl.int64)[:, None] * K
        acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        lo = tl.maximum(start, block * k_tiles) - block * k_tiles
        hi = tl.minimum(end, block * k_tiles + k_tiles) - block * k_tiles
        for kt in range(lo, hi):
            ks = kt * BLOCK_K + lanes_k
            w = tl.load(
                w_base + ks[None, :], mask=(cols < N)[:, None] & (ks < K)[None, :], other=0.0
            )
            x = tl.load(
                x_ptr + rows[:, None] * K + ks[None, :],
                mask=(rows < M)[:, None] & (ks < K)[None, :],
                other=0.0,
            )
            acc = tl.dot(x, tl.trans(w), acc)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        whole = owner(block * k_tiles, total, programs) == owner(
            block * k_tiles + k_tiles - 1, total, programs
        )
        if whole:
            tl.store(
                y_ptr + rows[:, None] * N + cols[None, :],
                (acc * scale).to(y_ptr.dtype.element_ty),
                mask=mask,
            )
        else:
            slot = (block != first_block).to(tl.int32)
            tl.store(part_ptr + (pid * 2 + slot) * 16 * BLOCK_N + tile, acc, mask=mask)
            tl.debug_barrier()
            first = owner(block * k_tiles, total, programs)
            last = owner(block * k_tiles + k_tiles - 1, total, programs)
            arrived = tl.atomic_add(count_ptr + block, 1, sem="acq_rel")
            if arrived == last - first:
                acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
                for p in range(first, last + 1):
                    s = (block != ((p * total) // programs) // k_tiles).to(tl.int32)
                    acc += tl.load(
                        part_ptr + (p * 2 + s) * 16 * BLOCK_N + tile,
                        mask=mask,
                        other=0.0,
                        cache_modifier=".cg",
                    )
                tl.store(
                    y_ptr + rows[:, None] * N + cols[None, :],
                    (acc * scale).to(y_ptr.dtype.element_ty),
                    mask=mask,
                )
                tl.atomic_xchg(count_ptr + block, 0)


dev = SMS = parts = counts = None  # set by main() on the GPU


def nested_call(cfg):
    bn, bk, per_sm, warps, stages = cfg

    def call(x, w, scale):
        n, k = w.shape
        y = torch.empty(x.shape[0], n, dtype=torch.bfloat16, device=dev)
        steps = triton.cdiv(n, bn) * triton.cdiv(k, bk)
        nested[(min(SMS * per_sm, steps),)](
            x,
            w,
            scale,
            y,
            parts,
            counts,
            x.shape[0],
            n,
            k,
            BLOCK_N=bn,
            BLOCK_K=bk,
            PER_SM=per_sm,
            num_warps=warps,
            num_stages=stages,
            **pdl_launch(True),
        )
        return y

    return call


def cublas(x, w, scale):
    return torch._scaled_mm(
        x, w.t(), scale_a=scale, scale_b=torch.ones((), device=dev), out_dtype=torch.bfloat16
    )


def skinny(x, w, scale):
    return gemv.skinny_gemm(x, w, scale, torch.bfloat16, pdl=True)


def main() -> None:
    global dev, SMS, parts, counts
    dev = torch.device("cuda")
    SMS = torch.cuda.get_device_properties(dev).multi_processor_count
    parts = torch.empty(SMS * 16 * 2 * 16 * 32, device=dev)
    counts = torch.zeros(1 << 16, dtype=torch.int32, device=dev)

    CFGS = [
        (16, 512, 1, 4, 8),
        (16, 1024, 1, 4, 6),
        (16, 512, 2, 4, 6),
        (16, 512, 4, 4, 4),
        (16, 256, 4, 4, 4),
        (16, 512, 8, 4, 1),
        (16, 1024, 4, 4, 1),
        (16, 256, 8, 4, 2),
        (32, 512, 2, 4, 4),
        (16, 1024, 2, 8, 4),
    ]
    SHAPES = [
        (2304, 16384),
        (5376, 16384),
        (6656, 16384),
        (9344, 16384),
        (13312, 16384),
        (75264, 16384),
        (16384, 2048),
        (16384, 2688),
        (16384, 3328),
        (16384, 6656),
        (16384, 37632),
    ]
    COPIES = 20
    out = {"gpu": torch.cuda.get_device_name(), "shapes": []}
    t_start = time.time()
    for n, k in SHAPES:
        copies = max(2, min(COPIES, int(4e9 // (n * k))))
        ws = [
            torch.randn(n, k, device=dev)
            .div(k**0.5)
            .mul(64)
            .clamp(-448, 448)
            .to(torch.float8_e4m3fn)
            for _ in range(copies)
        ]
        x = torch.randn(1, k, device=dev).mul(16).clamp(-448, 448).to(torch.float8_e4m3fn)
        scale = torch.tensor(0.01, device=dev)
        ref = cublas(x, ws[0], scale).float()
        paths = {
            "cublas": cublas,
            "skinny": skinny,
            **{f"streamK{c}": nested_call(c) for c in CFGS},
        }
        row = {"n": n, "k": k, "copies": copies, "MB": n * k / 1e6, "us": {}, "err": {}}
        for name, fn in paths.items():
            try:
                got = fn(x, ws[0], scale).float()
                row["err"][name] = ((got - ref).norm() / ref.norm()).item()
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for w in ws:
                        fn(x, w, scale)
                g.replay()
                torch.cuda.synchronize()
                times = []
                for _ in range(10):
                    a, b = (
                        torch.cuda.Event(enable_timing=True),
                        torch.cuda.Event(enable_timing=True),
                    )
                    a.record()
                    g.replay()
                    b.record()
                    b.synchronize()
                    times.append(a.elapsed_time(b) * 1e3 / copies)
                times.sort()
                row["us"][name] = round(times[len(times) // 2], 2)
            except Exception as e:  # noqa: BLE001
                row["us"][name] = repr(e)[:120]
        best = min((v, k2) for k2, v in row["us"].items() if isinstance(v, float))
        print(
            n,
            k,
            f"{n * k / 1e6:.0f}MB",
            "cublas",
            row["us"]["cublas"],
            "skinny",
            row["us"]["skinny"],
            "best",
            best,
            f"{n * k / best[0] / 1e6:.2f} TB/s",
            flush=True,
        )
        out["shapes"].append(row)
        del ws
        torch.cuda.empty_cache()
    out["s"] = time.time() - t_start
    json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "probe_gemm.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
