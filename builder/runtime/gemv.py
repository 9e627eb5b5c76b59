"""Skinny GEMMs (1-16 activation rows, 1-64 for W8A16: decode steps) through Triton, where they
beat cuBLAS.

At a few activation rows a linear is a pass over its weight, and how fast that pass streams
decides the decode step. cuBLAS's FP8 kernels at M=1 read weights at about 3.5 TB/s on an H200
(83% of the device copy bandwidth, scripts/bench_gpu.py). `skinny_gemm` is a Triton kernel on
the tensor cores (e4m3 or bf16 `tl.dot`, fp32 accumulation) over the row-major [N, K] weight:
each program owns BLOCK_N output features, walks K in BLOCK_K slices with the rows padded to
16 (or 32, 64), and applies the per-tensor scale (w_scale x a_scale, or 1) or, for INT8
weight-only (W8A16) codes converted to the activation's dtype in registers, each output
feature's scale before writing the output dtype.

Which one runs is measured, not assumed: `Chooser` checks the Triton kernel's result against
cuBLAS's (1e-2 relative, else it is never used) and times both (its block sizes autotuned)
once per (rows, N, K, dtype) with the L2 flushed before each trial
(triton.testing.do_bench), so the choice is made for weights streamed from HBM, as in a decode
step, and keeps cuBLAS wherever the kernel is not faster. Choices are made on the first call of
each shape, which the runtime makes before it captures a CUDA graph. Timed alone, a GEMM ranks
its paths differently than between the step's other kernels (on the H200, 13312 x 16384 FP8:
Triton 64.5 us and cuBLAS 69.4 alone, but 77.3 and 58.1 each in a graph of back-to-back calls,
scripts/results/h200_probe_gemm_in_graph_2026-12-02.json), so
`ResidentRuntime.tune_decode_linears` can set `Chooser.overrides` from the captured step's own
time, one shape at a time.

Measured and dropped (scripts/results/h200_bench_gpu_session4.json and
h200_bench_gpu_splitk_tiled_attention.json, the `us` of each shape): a one-row matrix-vector
kernel on the CUDA cores was 10-15% slower than this one on every shape (converting each e4m3
weight to fp32 bounds it), and splitting K into fp32 partial sums (for shapes with few output
features, such as q/k/v at TP8) was slower than cuBLAS at every split. Programs that each own
one K slice of one output block, with the whole slice of weight loaded before the wait under
programmatic dependent launch and the slices summed in the kernel, were 5-40% slower alone
on all but one shape and no faster in the decode step; nor was keeping this kernel where it
is up to 50% slower than cuBLAS, so that more of the step's kernels overlap
(scripts/results/h200_bench_gpu_pdl_2026-12-02.json).

Also measured and dropped (h200_bench_gpu_streamk_2026-12-02.json, and
scripts/probe_gemm_in_graph.py's results above): a stream-K kernel, the (output block, K tile)
steps cut evenly over one to eight programs per SM, the blocks cut between programs summed in
program order by the last to arrive. Alone it was 1.2-3.4x slower than the faster path on
every FP8 one-row shape; in a graph its best configuration came within 25% of cuBLAS only on
q/k/v at TP8 (18.6 us against 15.1) and was slower everywhere else: one program's pipelined
stream read about 14 GB/s, and few programs per SM cannot make up for it.

W8A16 (int8 codes, one scale per output feature; up to 64 rows, padded to 16, 32 or 64) was
also measured with the codes converted without conversion instructions: a code added to the
bits of the fp32 2^23 + 128 gives the fp32 2^23 + 128 + code, less 2^23 + 128 the code, whose
top 16 bits are its bf16. Alone it was slower on 16 of 22 one-row Ultra shapes, and the decode
step did not change (1.216 against 1.233 ms at TP8 batch 1): the conversion is not what bounds
the kernel (scripts/results/h200_bench_gpu_w8a16_bits_probe_2026-12-04.json; that run also had
256 x 128 and 128 x 256 tiles for 64 rows: 2.490 against 2.516 ms, within the spread).

Also measured and dropped (scripts/results/h200_probe_l2_prefetch_2026-12-04.json, commit
9a398bd's scripts/probe_l2_prefetch.py): each program asking the next 2-16 KiB of its weight
rows into L2 (cp.async.bulk.prefetch.L2) before its PDL wait, so HBM would stream during the
short kernel before. Slower at every size, alone and in the step (FP8 TP8 batch 1: 1.060 ms
without, 1.080-1.098 ms with; alone 150528 x 16384 FP8 562 us without, 567-898 us with).

And (h200_bench_gpu_swap_ab_2026-12-04.json, commit a46c640): the product computed as
W x^T, the weight block as the MMA's M side (64 or more), so that Hopper's wgmma runs it with
e4m3 operands as they are, instead of x W^T on mma.sync with the e4m3 weights converted to f16.
The autotuner picked it for most FP8 shapes alone, but the decode step did not change (FP8 TP8
batch 1 1.060 ms), q/k/v stayed slower than cuBLAS (28.9 against 20.6 us alone), and Triton's
default on sm_90 keeps an FP8 wgmma sum in Hopper's narrower-than-fp32 accumulator for all of K:
5.1e-3 relative error at K = 37632, against 1.3e-4 for cuBLAS and for this kernel.
tests/runtime/test_gemv.py now runs every configuration the autotuner may pick at that K with
fp32 output, held to 1/64 of an e4m3 step.

`pdl=True`: launched with programmatic dependent launch (builder/runtime/fused.py); each
program reads its first weight tile before it waits for the kernel before.

Triton is imported lazily: `available()` is False where it (or a CUDA device) is missing.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping

import torch

from builder.runtime.fused import pdl_launch

MAX_ROWS = 16
# W8A16 has no fast cuBLAS path at any row count (cuBLAS needs the codes cast to 16 bits: a
# copy of the weight per call), so its kernel also covers batched decode.
WEIGHT_ONLY_MAX_ROWS = 64


@functools.cache
def available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# (BLOCK_N, BLOCK_K, warps, stages) tried by the autotuner: for rows padded to 16, and smaller
# K slices for 32 or 64 rows, whose activation tile is 2-4x larger in registers and shared memory
SKINNY_CONFIGS = [
    (16, 512, 4, 4),
    (32, 256, 4, 4),
    (32, 512, 4, 3),
    (64, 256, 4, 4),
    (64, 128, 4, 5),
    (128, 128, 4, 4),
    (16, 1024, 4, 3),
    (32, 1024, 8, 3),
]
WIDE_CONFIGS = [
    (32, 256, 4, 4),
    (64, 128, 4, 4),
    (64, 256, 8, 3),
    (128, 128, 8, 3),
    (128, 64, 4, 4),
    (256, 64, 8, 3),
]


@functools.cache
def _kernel(wide: bool = False):
    import triton
    import triton.language as tl
    import triton.testing

    configs = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in (WIDE_CONFIGS if wide else SKINNY_CONFIGS)
    ]

    def bench(fn, quantiles):  # short trials; do_bench flushes the L2 before each one
        return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)

    @triton.autotune(configs=configs, key=["M", "N", "K"], do_bench=bench)
    @triton.jit
    def skinny(
        x_ptr,
        w_ptr,
        scale_ptr,
        y_ptr,
        M,
        N,
        K,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GDC: tl.constexpr,
        CHANNEL: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        rows = tl.arange(0, BLOCK_M)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok, col_ok = rows < M, cols < N
        x_base = x_ptr + rows[:, None] * K
        w_base = w_ptr + cols.to(tl.int64)[:, None] * K
        # the first weight tile is read before waiting on the kernel before (under PDL): no
        # kernel writes weights, and this program's stream starts during that kernel's tail
        ks = tl.arange(0, BLOCK_K)
        w_tile = tl.load(w_base + ks[None, :], mask=col_ok[:, None] & (ks < K)[None, :], other=0.0)
        if GDC:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        x = tl.load(x_base + ks[None, :], mask=row_ok[:, None] & (ks < K)[None, :], other=0.0)
        # int8 (W8A16) codes are exact in the activation's 16-bit type: converted in registers.
        # The loaded tile keeps its own (loop-carried) dtype; only the dot's operand converts.
        w_op = w_tile.to(x_ptr.dtype.element_ty)
        acc = tl.dot(x, tl.trans(w_op), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32))
        for k0 in range(BLOCK_K, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            x = tl.load(x_base + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_tile = tl.load(w_base + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            w_op = w_tile.to(x_ptr.dtype.element_ty)
            acc = tl.dot(x, tl.trans(w_op), acc)
        if CHANNEL:  # one scale per output feature (W8A16)
            out = acc * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
        else:
            out = acc * tl.load(scale_ptr)
        tl.store(
            y_ptr + rows[:, None] * N + cols[None, :],
            out.to(y_ptr.dtype.element_ty),
            mask=row_ok[:, None] & col_ok[None, :],
        )

    return skinny


def tuned_configs() -> list[dict]:
    """The autotuner's pick per key so far (rows, N, K and the operands' dtypes): block sizes,
    warps and stages, for the bench's record."""
    if not available():
        return []
    return [
        {
            "block_m": "32/64" if wide else 16,
            "key": [str(part) for part in key],
            **config.kwargs,
            "warps": config.num_warps,
            "stages": config.num_stages,
        }
        for wide in (False, True)
        for key, config in _kernel(wide).cache.items()
    ]


def skinny_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    out_dtype: torch.dtype,
    pdl: bool = False,
) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T x scale -> [M, N]. The weight is x's dtype (M <= MAX_ROWS),
    or int8 codes (W8A16) beside a 16-bit x (M <= WEIGHT_ONLY_MAX_ROWS); `scale` is 0-dim (per
    tensor) or [N] (per output feature), fp32. `pdl`: launched with programmatic dependent
    launch (fused.py)."""
    import triton

    m, k = x.shape
    n = weight.shape[0]
    limit = WEIGHT_ONLY_MAX_ROWS if weight.dtype == torch.int8 else MAX_ROWS
    if m > limit:
        raise ValueError(f"skinny_gemm: {m} rows, at most {limit} for a {weight.dtype} weight")
    block_m = max(16, triton.next_power_of_2(m))  # tl.dot's smallest M is 16
    y = torch.empty(m, n, dtype=out_dtype, device=weight.device)
    _kernel(block_m > 16)[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
        x,
        weight,
        scale,
        y,
        m,
        n,
        k,
        CHANNEL=scale.dim() == 1,
        BLOCK_M=block_m,
        **pdl_launch(pdl),
    )
    return y


def candidates(
    cublas: Callable[[], torch.Tensor],
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    out_dtype: torch.dtype,
    pdl: bool,
) -> dict[str, Callable[[], torch.Tensor]]:
    """The paths `Chooser` picks between for one skinny product, cuBLAS (the reference) first."""
    return {"cublas": cublas, "triton": lambda: skinny_gemm(x, weight, scale, out_dtype, pdl)}


def chosen(
    key: tuple,
    cublas: Callable[[], torch.Tensor],
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    out_dtype: torch.dtype,
    pdl: bool,
) -> torch.Tensor:
    """One skinny product by the path CHOOSER picked for `key` (measured on its first call)."""
    return CHOOSER.run(key, candidates(cublas, x, weight, scale, out_dtype, pdl))


class Chooser:
    """Per shape, the faster of cuBLAS and the Triton kernel: timed alone once (L2 flushed),
    unless `overrides` names a path (ResidentRuntime.tune_decode_linears sets it from the
    decode step's own time)."""

    def __init__(self):
        self.times_us: dict[tuple, dict[str, float]] = {}  # each accepted path's median
        self.rejected: dict[tuple, list[str]] = {}  # paths whose result was not the reference's
        self.overrides: dict[tuple, str] = {}
        self._seen: set[tuple] | None = None

    def run(self, key: tuple, paths: Mapping[str, Callable[[], torch.Tensor]]) -> torch.Tensor:
        """`paths` as `candidates` gives them: the first is the reference and the fallback."""
        if self._seen is not None:
            self._seen.add(key)
        if key not in self.times_us:
            if torch.cuda.is_current_stream_capturing():
                return paths[next(iter(paths))]()  # never timed in a capture (warm-up is first)
            self.times_us[key], self.rejected[key] = self.measure(paths)
        return paths[self.choice(key)]()

    def choice(self, key: tuple) -> str:
        times = self.times_us[key]
        return self.overrides.get(key) or min(times, key=times.get)

    @property
    def choices(self) -> dict[tuple, str]:
        return {key: self.choice(key) for key in self.times_us}

    @contextlib.contextmanager
    def recording(self) -> Iterator[set[tuple]]:
        """The keys of the products run inside the block."""
        self._seen = seen = set()
        try:
            yield seen
        finally:
            self._seen = None

    @staticmethod
    def measure(paths) -> tuple[dict[str, float], list[str]]:
        """Each accepted path's median time alone in microseconds (the reference first), and
        the paths whose result was more than 1e-2 (relative norm) from the reference's."""
        import triton.testing

        reference, *others = paths
        expected = paths[reference]().float()
        accepted, rejected = [reference], []
        for name in others:  # the first call of each autotunes it
            got = paths[name]().float()
            close = bool(((got - expected).norm() <= 1e-2 * expected.norm()).item())
            (accepted if close else rejected).append(name)
        times = {
            name: 1e3 * triton.testing.do_bench(paths[name], warmup=5, rep=40, return_mode="median")
            for name in accepted
        }
        return times, rejected

    def summary(self) -> list[dict]:
        return [
            {
                "rows": k[0],
                "n": k[1],
                "k": k[2],
                "dtype": str(k[3]).removeprefix("torch."),
                "path": v,
                "us": {name: round(t, 2) for name, t in self.times_us.get(k, {}).items()},
                **({"rejected": self.rejected[k]} if self.rejected.get(k) else {}),
                **({"chosen_in_the_step": True} if k in self.overrides else {}),
            }
            for k, v in sorted(self.choices.items(), key=str)
        ]


CHOOSER = Chooser()
