"""A Triton matrix-vector kernel for one-row linears (batch-1 decode), FP8 or BF16 weights.

At one activation row a linear is a pass over its weight: cuBLAS's FP8 kernels for M=1 read
the weights at about 3.5 TB/s on an H200 (83% of the device copy bandwidth, measured with
scripts/bench_gpu.py), below its BF16 ones. This kernel streams the row-major [N, K] weight
once: each program takes BLOCK_N rows and walks K in BLOCK_K slices, widening the e4m3 (or
bf16) weights and activation to fp32 and accumulating in fp32, then applies the per-tensor
scale (w_scale x a_scale, or 1) and writes the output dtype. Block sizes are autotuned per
(N, K) with the L2 flushed between trials (triton.testing.do_bench), so they are chosen for
weights streamed from HBM, as in a decode step.

Triton is imported lazily: `available()` is False where it (or a CUDA device) is missing and
the runtime keeps cuBLAS.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernel():
    import triton
    import triton.language as tl
    import triton.testing

    configs = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in [(4, 1024, 4, 3), (8, 512, 4, 3), (8, 1024, 4, 3), (16, 512, 4, 3),
                             (16, 512, 8, 4), (32, 256, 4, 4), (8, 2048, 8, 3), (4, 2048, 4, 4)]
    ]

    def bench(fn, quantiles):  # short trials; do_bench flushes the L2 before each one
        return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)

    @triton.autotune(configs=configs, key=["N", "K"], do_bench=bench)
    @triton.jit
    def gemv(x_ptr, w_ptr, scale_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        base = w_ptr + rows.to(tl.int64)[:, None] * K
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            w = tl.load(base + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            acc += w.to(tl.float32) * x[None, :]
        out = tl.sum(acc, axis=1) * tl.load(scale_ptr)
        tl.store(y_ptr + rows, out.to(y_ptr.dtype.element_ty), mask=row_ok)

    return gemv


def gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """x [K] (or [1, K]) times the row-major weight [N, K]^T, times the 0-dim fp32 `scale`."""
    import triton

    n, k = weight.shape
    y = torch.empty(n, dtype=out_dtype, device=weight.device)
    _kernel()[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](x.reshape(k), weight, scale, y, n, k)
    return y
