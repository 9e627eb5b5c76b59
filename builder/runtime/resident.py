"""A resident runtime for TensorRT-LLM DeciLM checkpoints: weights on the device, a static KV
cache, prefill then decode steps replayed as CUDA graphs.

Where `TrtllmCheckpointExecutor` is the reference (it reads every weight from the mapped rank
files on every forward and recomputes the whole sequence), `ResidentRuntime` is built to be
fast on a GPU and checked against it:

- The weights of the ranks it runs are copied to the device once, at construction. It runs
  either every rank of the checkpoint's tp x pp layout on one device (partials combined as the
  collectives would: the reference's semantics) or one rank alone (`rank=r`, pp 1): that GPU's
  share of a TP deployment with the collectives left out, which is what a per-GPU benchmark
  measures; its logits are then that rank's vocabulary shard.
- The per-layer work is decided once from the plan: construction turns each block into a list
  of parts (attention, linear replacement, gated MLP), each holding its resident tensors and
  its KV cache; a no-op part is simply not built. A forward is a loop over those parts, with
  no branching on block kinds (vLLM's DeciLMDecoderLayer builds its modules the same way).
- Linears: BF16 (or the checkpoint dtype) through `F.linear`; float8_e4m3fn weights through
  `torch._scaled_mm` with the checkpoint's per-tensor scales (`fp8_gemm="scaled-mm"`, the
  default), the weight laid out once at load as the column-major operand cuBLASLt wants (the
  transpose of a row-major [out, in] weight is one, without a copy). `fp8_gemm="emulate"`
  runs the executor's emulation instead (the same rounding of the activation, fp32 GEMM).
  The activation quantization is fused into the op that produces the activation (the RMSNorm
  and residual add before qkv/fc/gate; the SiLU-gate product before proj; the attention
  output before dense), so it is no separate pass over memory: on CUDA each of these chains
  is one kernel (Triton, builder/runtime/fused.py; torch.compile for the attention output
  of prefill). A decode step's attention (scores, softmax, weighted values and the dense
  linear's quantization) is one Triton kernel too.
  fc and gate are one GEMM over their concatenated weights (they share their FP8 scales).
  Linears of <= 16 rows (decode) use a Triton skinny GEMM per shape where it measured faster
  than cuBLAS (builder/runtime/gemv.py).
- KV cache: static, on the device, one [max_batch, kv_heads, max_seq, head_dim] pair per
  attention layer and rank, sized from that layer's own KV-head count (at tp > kv_heads the
  duplicated head, as the checkpoint stores it); linear-replacement and no-op attention layers
  have none. max_seq is rounded up to whole tiles of the fused decode attention (64
  positions), so every span a decode step attends over is whole tiles. With an FP8 KV cache,
  k and v are rounded through e4m3 with the layer's `kv_cache_scaling_factor` before they are
  stored (the values the executor attends to).
- Decode: one token per sequence per step at one shared position (a static batch of equal
  length prompts); attention reads the cache up to a power-of-two span >= the position, so a
  step's reads grow with the sequence, not with max_seq. On CUDA each (batch, span) step is
  captured once as a CUDA graph and replayed (`graphs=True`); on CPU the same step runs eagerly.
  On Hopper and later the Triton kernels are launched with programmatic dependent launch
  (`pdl=True`): each may start while the kernel before it finishes and waits for its results
  inside, which hides the launches of a step's ~90 short kernels (same results, bit for bit).

Numerics against the executor (tests/runtime/test_resident.py). Prefill performs the
executor's operations in its order, so in float32 the two agree to float32 rounding (the merged
fc/gate GEMM and the decode attention over the cache only reorder fp32 sums). In bfloat16 every
op that is reordered (the merged GEMM's kernel choice, the attention over the cache instead
of the causal kernel, the fused kernels that keep fp32 between ops) may round an element to
the neighbouring bf16 value: each such difference is one bf16 rounding (2^-8 relative) at one
op, the same kind and size of error that bf16 execution as a whole makes against fp32. So the
bound used is relative to the bf16 execution noise itself, |bf16 - fp32|: the two bf16 results
each sit within it of the fp32 result, hence within 2x of each other (triangle inequality).
FP8: the runtime quantizes exactly as the emulation (division by the activation scale, clamp
to +-448, round to e4m3); _scaled_mm accumulates the same e4m3 products in another order. Per
GEMM, on the same e4m3 input, that is an fp32-rounding difference (<= K x 2^-24, bounded at
1e-5 on the CPU; the H200's FP8 tensor cores measured 1.3e-4, still ~100x below one e4m3
step). End to end, such a difference flips the e4m3 rounding of values near a midpoint, each
flip perturbs the next layer's inputs by a full e4m3 step, and flips cascade with depth, so two
FP8 executions of one model can differ by up to the FP8 quantization error itself (|fp8 - bf16|,
measured on the same inputs) but not beyond: that is the end-to-end bound.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from builder.arch.plan import AttentionKind, FfnKind, LayerPlan, ModelPlan
from builder.arch.tensors import (
    Group,
    Role,
    fused_roles,
    kv_cache_scale_name,
    kv_heads_per_rank,
    per_channel_scale_name,
    scale_names,
    stage_layers,
    trtllm_module,
    trtllm_weight,
)
from builder.dtypes import FP8_MAX
from builder.errors import UserError
from builder.io.trtllm_checkpoint import (
    mapping_of,
    plan_from_trtllm_config,
    rank_file_name,
    read_trtllm_config,
)
from builder.runtime import gemv as matvec
from builder.runtime.executor import (
    Generation,
    fp8_round_trip,
    fp8_rowwise_linear,
    rope_inv_freq,
    rotate,
    token_scales,
    trtllm_weight_only_codes,
    weight_only_modules,
)
from builder.runtime.fused import DECODE_TILE

FP8 = torch.float8_e4m3fn
FP8_GEMMS = ("scaled-mm", "emulate")
MIN_SPAN = 256  # smallest attention span of a decode step (one graph per power of two above)

TensorSource = Callable[[int, str], torch.Tensor]
"""(rank, tensor name) -> the tensor as the rank file stores it; KeyError if it has none."""


# ---- fused elementwise chains --------------------------------------------------------------------
# Plain functions with the executor's order of operations; `Kernels` compiles them on CUDA so
# that each chain (and the FP8 quantization at its end) is one kernel.
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def quantize(x: torch.Tensor, a_scale: torch.Tensor) -> torch.Tensor:
    """e4m3(x / a_scale), the executor's activation rounding."""
    return (x.float() / a_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def add_norm(x, delta, weight, eps):
    x = x + delta
    return x, rms_norm(x, weight, eps)


def add_norm_quant(x, delta, weight, eps, a_scale):
    x = x + delta
    return x, quantize(rms_norm(x, weight, eps), a_scale)


def silu_mul(fc_gate: torch.Tensor, width: int) -> torch.Tensor:
    return F.silu(fc_gate[..., :width]) * fc_gate[..., width:]


def silu_mul_quant(fc_gate, width, a_scale):
    return quantize(silu_mul(fc_gate, width), a_scale)


def split_rotate(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as [batch, heads, seq, head_dim] from a rank's qkv output; q and k rotated."""
    batch, seq, _ = qkv.shape
    q, k, v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.view(batch, seq, q_heads, head_dim).transpose(1, 2)
    k = k.view(batch, seq, kv_heads, head_dim).transpose(1, 2)
    v = v.view(batch, seq, kv_heads, head_dim).transpose(1, 2)
    return rotate(q, cos, sin), rotate(k, cos, sin), v


def softmax_attend(scores: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax (in fp32) of the scaled scores over the valid cache positions, in their dtype."""
    return (scores.float() * scale).masked_fill(~valid, float("-inf")).softmax(-1).to(scores.dtype)


class Kernels:
    """The elementwise chains: on CUDA the add+norm and SiLU chains are builder/runtime/fused.py's
    Triton kernels (`triton=True`), the rest compiled once per process (shape-generic)."""

    _compiled: ClassVar[dict[str, Callable]] = {}
    NAMES = (
        "add_norm",
        "add_norm_quant",
        "silu_mul",
        "silu_mul_quant",
        "quantize",
        "split_rotate",
        "softmax_attend",
    )
    TRITON = ("add_norm", "add_norm_quant", "silu_mul", "silu_mul_quant")
    DECODE_ONLY = ("rope_cache", "decode_attention")  # Triton only: eager is another op chain

    def __init__(self, compile: bool, triton: bool = False):
        self.triton, self.pdl = triton, False
        source = globals()
        if compile:  # one compiled function serves every layer's shapes, dtypes and batches
            import torch._dynamo

            for limit in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, limit):
                    setattr(
                        torch._dynamo.config, limit, max(64, getattr(torch._dynamo.config, limit))
                    )
        for name in self.NAMES:
            if triton and name in self.TRITON:
                continue  # bound to the Triton kernel below
            fn = source[name]
            if compile:
                if name not in Kernels._compiled:
                    Kernels._compiled[name] = torch.compile(fn, dynamic=True, fullgraph=True)
                fn = Kernels._compiled[name]
            setattr(self, name, fn)
        self.rope_cache = self.decode_attention = None
        if triton:
            for name in (*self.TRITON, *self.DECODE_ONLY):
                self.use_triton(name)

    def set_pdl(self, enabled: bool) -> None:
        """Rebind the Triton kernels in use, launched with programmatic dependent launch or not
        (a kernel switched off, e.g. the fused decode attention, stays off)."""
        self.pdl = enabled and self.triton
        for name in (*self.TRITON, *self.DECODE_ONLY):
            if self.triton and getattr(self, name) is not None:
                self.use_triton(name)

    def use_triton(self, name: str) -> None:
        from builder.runtime import fused

        setattr(self, name, functools.partial(getattr(fused, name), pdl=self.pdl))


# ---- linears -------------------------------------------------------------------------------------
class DenseLinear:
    """x @ W.T with the resident weight; its input needs no preparation. One-row inputs go
    (up to 16: decode steps) go through builder/runtime/gemv.py's chooser when `gemv`."""

    a_scale = None
    pdl = False  # the skinny GEMM launched with programmatic dependent launch

    def __init__(self, weight: torch.Tensor, gemv: bool = False):
        self.weight = weight
        self.out_features = weight.shape[0]
        self.gemv = gemv
        self.one = torch.ones((), device=weight.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if (
            self.gemv
            and rows.shape[0] <= matvec.MAX_ROWS
            and x.dtype == self.weight.dtype != torch.float32
        ):
            key = (rows.shape[0], *self.weight.shape, self.weight.dtype)
            out = matvec.chosen(
                key,
                lambda: F.linear(rows, self.weight),
                rows,
                self.weight,
                self.one,
                x.dtype,
                self.pdl,
            )
            return out.reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes


class Fp8Linear:
    """Per-tensor FP8 GEMM of an e4m3 activation (quantized by the op before) with e4m3 W."""

    pdl = False

    def __init__(
        self,
        weight: torch.Tensor,
        w_scale: torch.Tensor,
        a_scale: torch.Tensor,
        gemm: str,
        dtype: torch.dtype,
        row_multiple: int,
        gemv: bool = False,
    ):
        self.weight = weight  # row-major [out, in]: the matrix-vector kernel's operand
        self.weight_t = weight.t()  # column-major [in, out]: _scaled_mm's second operand
        self.w_scale = w_scale.reshape(()).float()
        self.a_scale = a_scale.reshape(()).float()
        self.out_features = weight.shape[0]
        self.dtype, self.row_multiple = dtype, row_multiple
        self.emulate = gemm == "emulate"
        self.gemv = gemv and not self.emulate
        self.scale = self.w_scale * self.a_scale

    def __call__(self, xq: torch.Tensor) -> torch.Tensor:
        if self.emulate:  # the executor's fp8_linear, given the same e4m3 activation
            return (F.linear(xq.float(), self.weight_t.t().float()) * self.scale).to(self.dtype)
        rows = xq.reshape(-1, xq.shape[-1])
        if self.gemv and rows.shape[0] <= matvec.MAX_ROWS:
            key = (rows.shape[0], *self.weight.shape, self.weight.dtype, self.dtype)
            out = matvec.chosen(
                key, lambda: self.cublas(rows), rows, self.weight, self.scale, self.dtype, self.pdl
            )
        else:
            out = self.cublas(rows)
        return out.reshape(*xq.shape[:-1], self.out_features)

    def cublas(self, rows: torch.Tensor) -> torch.Tensor:
        pad = -rows.shape[0] % self.row_multiple
        if pad:
            rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])
        out = torch._scaled_mm(
            rows, self.weight_t, scale_a=self.a_scale, scale_b=self.w_scale, out_dtype=self.dtype
        )
        return out[: out.shape[0] - pad]

    @property
    def nbytes(self) -> int:
        return self.weight_t.nbytes

    def with_gemm(self, gemm: str, dtype: torch.dtype) -> Fp8Linear:
        """The same resident weight and scales through another GEMM path / output dtype."""
        row_multiple = self.row_multiple if gemm == "scaled-mm" else 1
        return Fp8Linear(
            self.weight, self.w_scale, self.a_scale, gemm, dtype, row_multiple, self.gemv
        )


class RowwiseFp8Linear:
    """Per-channel FP8 weights with per-token activation scales (TensorRT-LLM's
    FP8_PER_CHANNEL_PER_TOKEN): e4m3(x / s_tok) @ W^T x s_tok x s_chan on cuBLAS's
    row-scaled FP8 GEMM (`_scaled_mm` with [rows, 1] and [1, out] fp32 scales). The input
    arrives in the compute dtype: its scales are each token's own amax / 448, so the op
    before cannot quantize it (`a_scale` None), and the quantization is computed here."""

    a_scale = None

    def __init__(
        self,
        weight: torch.Tensor,
        channel_scale: torch.Tensor,
        gemm: str,
        dtype: torch.dtype,
        row_multiple: int,
    ):
        self.weight_t = weight.t()  # column-major [in, out]: _scaled_mm's second operand
        self.channel_scale = channel_scale.float().reshape(1, -1)
        self.out_features = weight.shape[0]
        self.dtype, self.row_multiple = dtype, row_multiple
        self.emulate = gemm == "emulate"
        self.gemv = False  # no skinny path: one-row steps use cuBLAS too
        self.pdl = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.emulate:  # the executor's fp8_rowwise_linear, bit for bit
            return fp8_rowwise_linear(x, self.weight_t.t(), self.channel_scale).to(self.dtype)
        rows = x.reshape(-1, x.shape[-1])
        scale = token_scales(rows)
        xq = (rows.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        pad = -rows.shape[0] % self.row_multiple
        if pad:
            xq = torch.cat([xq, xq.new_zeros(pad, xq.shape[1])])
            scale = torch.cat([scale, scale.new_ones(pad, 1)])
        out = torch._scaled_mm(
            xq, self.weight_t, scale_a=scale, scale_b=self.channel_scale, out_dtype=self.dtype
        )
        return out[: rows.shape[0]].reshape(*x.shape[:-1], self.out_features)

    @property
    def nbytes(self) -> int:
        return self.weight_t.nbytes

    def with_gemm(self, gemm: str, dtype: torch.dtype) -> RowwiseFp8Linear:
        row_multiple = self.row_multiple if gemm == "scaled-mm" else 1
        return RowwiseFp8Linear(self.weight_t.t(), self.channel_scale, gemm, dtype, row_multiple)


class WeightOnlyInt8Linear:
    """TensorRT-LLM's W8A16 linear: int8 codes and one scale per output channel, as its build
    rounds the checkpoint's 16-bit weight (executor.trtllm_weight_only_codes), activations in
    the compute dtype, y = (x @ codes^T) x scale. Resident: the codes (FP8's bytes) and the
    scales. With `emulate` the executor's fp32 product of the dequantized weight, bit for bit;
    otherwise 16-bit GEMMs: up to 64 rows (decode) the Triton skinny GEMM (codes converted in
    registers, builder/runtime/gemv.py) where the chooser measured it faster, else the codes
    cast to the compute dtype for one cuBLAS GEMM (a transient copy of the weight: prefill)."""

    a_scale = None
    pdl = False

    def __init__(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        dtype: torch.dtype,
        emulate: bool,
        gemv: bool = False,
    ):
        self.codes = codes
        self.scale = scale  # [out] in the checkpoint dtype, as the build stores it
        self.channel_scale = scale.float()
        self.out_features = codes.shape[0]
        self.dtype, self.emulate = dtype, emulate
        # Triton's fp32 dot is TF32: fp32 runs keep cuBLAS's full precision (as DenseLinear)
        self.gemv = gemv and not emulate and dtype != torch.float32

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.emulate:  # executor.WeightOnlyInt8Linear's product
            weight = self.codes.float() * self.channel_scale[:, None]
            return F.linear(x.float(), weight).to(self.dtype)
        rows = x.reshape(-1, x.shape[-1])
        if self.gemv and rows.shape[0] <= matvec.WEIGHT_ONLY_MAX_ROWS:
            key = (rows.shape[0], *self.codes.shape, self.codes.dtype, self.dtype)
            out = matvec.chosen(
                key,
                lambda: self.cublas(rows),
                rows,
                self.codes,
                self.channel_scale,
                self.dtype,
                self.pdl,
            )
        else:
            out = self.cublas(rows)
        return out.reshape(*x.shape[:-1], self.out_features)

    def cublas(self, rows: torch.Tensor) -> torch.Tensor:
        out = F.linear(rows.to(self.dtype), self.codes.to(self.dtype)).float()
        return (out * self.channel_scale).to(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes


Linear = DenseLinear | Fp8Linear | RowwiseFp8Linear | WeightOnlyInt8Linear


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch: CUDA devices of compute capability 9.0 (Hopper) on."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def scaled_mm_row_multiple(device: torch.device) -> int:
    """1 if _scaled_mm takes any number of rows on `device`, else the multiple it needs (16)."""
    a = torch.zeros(1, 32, device=device).to(FP8)
    b = torch.zeros(32, 32, device=device).to(FP8)
    one = torch.ones((), device=device)
    try:
        torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        return 1
    except RuntimeError:
        return 16


# ---- per-step context -------------------------------------------------------------------------
@dataclass
class Step:
    """What every part needs for one forward: rotary tables for the positions, and for decode
    the position tensor, the cache span to attend over and its valid-position mask."""

    cos: torch.Tensor | None  # [seq, head_dim] (None where the fused rotary kernel reads `tables`)
    sin: torch.Tensor | None
    decode: bool
    batch: int
    tables: tuple[torch.Tensor, torch.Tensor] | None = (
        None  # the whole [max_seq, head_dim] cos, sin
    )
    pos: torch.Tensor | None = None  # [1] long: where decode writes
    span: int = 0
    valid: torch.Tensor | None = None  # [span] bool


# ---- parts ------------------------------------------------------------------------------------
class Part:
    """One half of a block: an RMSNorm, then per-rank work whose partials are combined.

    `prepare` is the fused add-residual + norm (+ FP8 quantization of the first linear's
    input); the ranks share its output (replicated norm weights, identical scales on every
    rank, as the exporters write them).
    """

    def __init__(
        self,
        name: str,
        norm: torch.Tensor,
        ranks: list,
        combine: Callable[[list[torch.Tensor]], torch.Tensor],
        kernels: Kernels,
        eps: float,
    ):
        self.name, self.norm, self.ranks = name, norm, ranks
        self.a_scale = ranks[0].first.a_scale
        self.combine, self.kernels, self.eps = combine, kernels, eps

    def __call__(
        self, x: torch.Tensor, delta: torch.Tensor, step: Step
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.a_scale is None:
            x, h = self.kernels.add_norm(x, delta, self.norm, self.eps)
        else:
            x, h = self.kernels.add_norm_quant(x, delta, self.norm, self.eps, self.a_scale)
        return x, self.combine([rank(h, step) for rank in self.ranks])


class LinearRank:
    """A linear replacement (attention or FFN): one column-parallel linear."""

    def __init__(self, linear: Linear):
        self.linear = self.first = linear

    def __call__(self, h: torch.Tensor, step: Step) -> torch.Tensor:
        return self.linear(h)


class MlpRank:
    """proj(silu(fc(h)) * gate(h)) on this rank's slice of the width; fc|gate one GEMM."""

    def __init__(self, fc_gate: Linear, proj: Linear, kernels: Kernels):
        self.fc_gate, self.proj, self.kernels = fc_gate, proj, kernels
        self.first = fc_gate
        self.width = fc_gate.out_features // 2

    def __call__(self, h: torch.Tensor, step: Step) -> torch.Tensor:
        fc_gate = self.fc_gate(h)
        if self.proj.a_scale is None:
            inner = self.kernels.silu_mul(fc_gate, self.width)
        else:
            inner = self.kernels.silu_mul_quant(fc_gate, self.width, self.proj.a_scale)
        return self.proj(inner)


class AttentionRank:
    """This rank's heads: qkv, rotary, the KV cache, attention, then its slice of dense."""

    def __init__(
        self,
        qkv: Linear,
        dense: Linear,
        q_heads: int,
        kv_heads: int,
        head_dim: int,
        kv_scale: torch.Tensor | None,
        cache: tuple[torch.Tensor, torch.Tensor],
        kernels: Kernels,
    ):
        self.qkv, self.dense, self.kernels = qkv, dense, kernels
        self.first = qkv
        self.q_heads, self.kv_heads, self.head_dim = q_heads, kv_heads, head_dim
        self.kv_scale = kv_scale
        self.k_cache, self.v_cache = cache
        self.scale = head_dim**-0.5

    def __call__(self, h: torch.Tensor, step: Step) -> torch.Tensor:
        qkv = self.qkv(h)
        batch, seq, _ = qkv.shape
        if self.kernels.rope_cache is not None:  # one kernel: q out, k and v into the cache
            pos = step.pos if step.decode else qkv.new_zeros(1, dtype=torch.long)
            q = self.kernels.rope_cache(
                qkv,
                *step.tables,
                pos,
                self.k_cache,
                self.v_cache,
                self.q_heads,
                self.kv_heads,
                self.head_dim,
                self.kv_scale,
                step.decode,
            )
            if step.decode and self.kernels.decode_attention is not None:
                # two kernels: attention, and the dense linear's e4m3 input
                return self.dense(
                    self.kernels.decode_attention(
                        q,
                        self.k_cache,
                        self.v_cache,
                        step.valid,
                        self.scale,
                        self.kv_heads,
                        self.dense.a_scale,
                    )
                )
            out = self.decode_cached(q, step) if step.decode else self.prefill_cached(q, seq)
            return self.project(out, batch, seq)
        q, k, v = self.kernels.split_rotate(
            qkv, step.cos, step.sin, self.q_heads, self.kv_heads, self.head_dim
        )
        if self.kv_scale is not None:
            k, v = (
                fp8_round_trip(k, self.kv_scale).to(q.dtype),
                fp8_round_trip(v, self.kv_scale).to(q.dtype),
            )
        out = self.decode(q, k, v, step) if step.decode else self.prefill(q, k, v)
        return self.project(out, batch, seq)

    def project(self, out: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
        out = out.transpose(1, 2).reshape(batch, seq, self.q_heads * self.head_dim)
        if self.dense.a_scale is not None:
            out = self.kernels.quantize(out, self.dense.a_scale)
        return self.dense(out)

    def prefill(self, q, k, v):
        batch, _, seq, _ = k.shape
        self.k_cache[:batch, :, :seq] = k
        self.v_cache[:batch, :, :seq] = v
        return self.prefill_cached(q, seq)

    def prefill_cached(self, q, seq):
        batch = q.shape[0]
        k, v = self.k_cache[:batch, :, :seq], self.v_cache[:batch, :, :seq]
        groups = self.q_heads // self.kv_heads  # the rank's query heads map into its kv heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)

    def decode(self, q, k, v, step: Step):
        batch = q.shape[0]
        self.k_cache[:batch].index_copy_(2, step.pos, k)
        self.v_cache[:batch].index_copy_(2, step.pos, v)
        return self.decode_cached(q, step)

    def decode_cached(self, q, step: Step):
        """One query per sequence against the cache: [batch, kv, groups, 1|hd] batched GEMMs."""
        batch = q.shape[0]
        keys = self.k_cache[:batch, :, : step.span]
        values = self.v_cache[:batch, :, : step.span]
        qg = q.reshape(batch, self.kv_heads, -1, self.head_dim)  # head j -> kv head j // groups
        scores = torch.matmul(qg, keys.transpose(-1, -2))
        probs = self.kernels.softmax_attend(scores, step.valid, self.scale)
        return torch.matmul(probs, values).reshape(batch, self.q_heads, 1, self.head_dim)


def linears_of(work) -> list[Linear]:
    """The distinct linears a rank's part holds (`first` is one of them again)."""
    found = {id(v): v for v in vars(work).values() if isinstance(v, Linear)}
    return list(found.values())


def all_reduce(parts: list[torch.Tensor]) -> torch.Tensor:
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def all_gather(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


@dataclass(frozen=True)
class LinearTrial:
    """One shape of `ResidentRuntime.tune_decode_linears`: the decode step's median time (ms)
    with each path, and the path kept."""

    key: tuple
    step_ms: dict[str, float]
    kept: str

    def as_json(self) -> dict:
        rows, n, k, dtype, *_ = self.key
        return {
            "rows": rows,
            "n": n,
            "k": k,
            "dtype": str(dtype).removeprefix("torch."),
            "step_ms": self.step_ms,
            "kept": self.kept,
        }


@dataclass(frozen=True)
class Graph:
    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor
    logits: torch.Tensor


# ---- the runtime -------------------------------------------------------------------------------
class ResidentRuntime:
    """Runs a TensorRT-LLM DeciLM checkpoint with its weights resident on `device`.

    `prefill(ids [batch, seq])` fills the cache and returns the logits of every position
    (float32); `decode(ids [batch])` appends one token per sequence and returns [batch, vocab];
    `generate(ids, steps)` is greedy decoding. Build with `from_checkpoint(directory)` or, for
    weights made in memory (benchmarks), `from_tensors(config, source)` - the same code path.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        source: TensorSource,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        rank: int | None = None,
        fp8_gemm: str = "scaled-mm",
        max_batch: int = 8,
        max_seq: int = 512,
        graphs: bool | None = None,
        compile: bool | None = None,
        gemv: bool | None = None,
        pdl: bool | None = None,
        weight_only: Callable[[str], bool] | None = None,
    ):
        """`gemv` (default: on CUDA where Triton imports) enables the Triton kernels: skinny
        GEMMs (builder/runtime/gemv.py) and the fused norm / SiLU chains (fused.py). `pdl`
        (default: with them, on Hopper and later) launches those kernels with programmatic
        dependent launch. `weight_only(module)`: whether a 16-bit linear is W8A16 (default:
        from the config; from_checkpoint reads a mixed checkpoint's quant_cfg.json)."""
        self.config = dict(config)
        self.plan: ModelPlan = plan_from_trtllm_config(config)
        self.tp, self.pp = mapping_of(config)
        self.device, self.dtype = torch.device(device), dtype
        cuda = self.device.type == "cuda"
        self.graphs_enabled = cuda if graphs is None else graphs and cuda
        self.gemv = (cuda and matvec.available()) if gemv is None else gemv
        self.kernels = Kernels(cuda if compile is None else compile, triton=self.gemv)
        if fp8_gemm not in FP8_GEMMS:
            raise UserError(f"fp8_gemm {fp8_gemm!r}: expected one of {', '.join(FP8_GEMMS)}")
        self.fp8_gemm = fp8_gemm
        # whole tiles of the fused decode attention: every span a step attends over is one
        self.max_batch, self.max_seq = max_batch, -(-max_seq // DECODE_TILE) * DECODE_TILE
        quant = self.config.get("quantization") or {}
        self.kv_cache_fp8 = quant.get("kv_cache_quant_algo") == "FP8"
        self.rank = rank
        if rank is not None and not (self.pp == 1 and 0 <= rank < self.tp):
            raise UserError(
                f"rank {rank}: a single rank runs only with pp 1 and 0 <= rank < tp {self.tp}"
            )
        self.source = source
        self.weight_only = weight_only or weight_only_modules(None, self.config)
        self._row_multiple: int | None = None
        self.weight_bytes = 0
        first_ranks, last_ranks = self.stage_ranks(0), self.stage_ranks(self.pp - 1)
        self.embedding = self.tensor(first_ranks[0], trtllm_weight(Role.EMBEDDING), dtype)
        self.parts: list[Part] = []
        for pp_rank in range(self.pp):
            for local, index in enumerate(stage_layers(self.plan, self.pp, pp_rank)):
                self.parts += self.build_block(
                    self.plan.layers[index], local, self.stage_ranks(pp_rank)
                )
        self.final_norm = self.tensor(last_ranks[0], trtllm_weight(Role.FINAL_NORM), dtype)
        self.lm_head = [self.linear(r, trtllm_module(Role.LM_HEAD)) for r in last_ranks]
        inv_freq = rope_inv_freq(self.plan.head_dim, self.plan.rope_theta, self.plan.rope_scaling)
        angles = torch.arange(self.max_seq, dtype=torch.float32)[:, None] * inv_freq
        emb = torch.cat([angles, angles], dim=-1)
        self.cos, self.sin = (
            emb.cos().to(dtype).to(self.device),
            emb.sin().to(dtype).to(self.device),
        )
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.positions = torch.arange(self.max_seq, device=self.device)
        self.length = 0  # tokens in the cache (host copy of pos)
        self.batch = 0
        self._graphs: dict[tuple[int, int], Graph] = {}
        self._pool = None
        self.set_pdl(pdl_supported(self.device) if pdl is None else pdl)

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_tensors(
        cls,
        config: Mapping[str, Any],
        source: TensorSource | Sequence[Mapping[str, torch.Tensor]],
        **kwargs,
    ) -> ResidentRuntime:
        """From tensors in memory: `source` is a TensorSource or one name->tensor map per rank
        (only the ranks the runtime runs are read)."""
        if not callable(source):
            maps = source

            def source(rank: int, name: str) -> torch.Tensor:
                return maps[rank][name]

        return cls(config, source, **kwargs)

    @classmethod
    def from_checkpoint(cls, directory: str | Path, **kwargs) -> ResidentRuntime:
        """From a checkpoint directory: each tensor is read once from its rank file."""
        directory = Path(directory)
        config, _ = read_trtllm_config(directory)
        with ExitStack() as stack:
            files: dict[int, Any] = {}
            names: dict[int, set[str]] = {}

            def source(rank: int, name: str) -> torch.Tensor:
                if rank not in files:
                    path = directory / rank_file_name(rank)
                    if not path.is_file():
                        raise UserError(
                            f"{path}: missing (world size {math.prod(mapping_of(config))})"
                        )
                    files[rank] = stack.enter_context(safe_open(str(path), framework="pt"))
                    names[rank] = set(files[rank].keys())
                if name not in names[rank]:
                    raise KeyError(name)
                try:
                    return files[rank].get_tensor(name)
                except SafetensorError as err:
                    raise UserError(
                        f"{directory / rank_file_name(rank)}: tensor {name!r} unreadable ({err})"
                    ) from None

            kwargs.setdefault("weight_only", weight_only_modules(directory, config))
            return cls(config, source, **kwargs)

    def stage_ranks(self, pp_rank: int) -> list[int]:
        if self.rank is not None:
            return [self.rank]
        return [pp_rank * self.tp + t for t in range(self.tp)]

    def tensor(self, rank: int, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A rank's tensor on the device (cast to `dtype` if given), counted as resident."""
        try:
            value = self.source(rank, name)
        except KeyError:
            raise UserError(f"{rank_file_name(rank)}: tensor {name!r} missing") from None
        value = value.to(device=self.device, dtype=dtype or value.dtype)
        self.weight_bytes += value.nbytes
        return value

    def optional(self, rank: int, name: str) -> torch.Tensor | None:
        try:
            value = self.source(rank, name)
        except KeyError:
            return None
        return value.to(self.device)

    def row_multiple(self) -> int:
        if self._row_multiple is None:
            self._row_multiple = scaled_mm_row_multiple(self.device)
        return self._row_multiple

    def linear(self, rank: int, module: str, fuse: Sequence[str] = ()) -> Linear:
        """Module `module` of `rank` (with `fuse`: those modules' weights stacked below it)."""
        names = [module, *fuse]
        weights = [self.source_weight(rank, m) for m in names]
        if weights[0].dtype != FP8:
            weight = weights[0] if len(weights) == 1 else torch.cat(weights)
            weight_only = {self.weight_only(m) for m in names}
            if len(weight_only) > 1:  # a recipe's fused group shares one format
                raise UserError(
                    f"{rank_file_name(rank)}: {', '.join(names)} mix W8A16 and BF16; "
                    "the runtime fuses them into one GEMM"
                )
            if not weight_only.pop():
                return DenseLinear(self.resident(weight.to(self.dtype)), self.gemv)
            codes, scale = trtllm_weight_only_codes(weight)  # per row: fusing first is the same
            self.weight_bytes += scale.nbytes
            return WeightOnlyInt8Linear(
                self.resident(codes), scale, self.dtype, self.fp8_gemm == "emulate", self.gemv
            )
        row_multiple = 1 if self.fp8_gemm == "emulate" else self.row_multiple()
        channel = [self.optional(rank, per_channel_scale_name(f"{m}.weight")) for m in names]
        if any(c is not None for c in channel):
            if any(c is None for c in channel):  # a recipe's fused group shares one format
                raise UserError(
                    f"{rank_file_name(rank)}: {', '.join(names)} mix per-channel and "
                    "per-tensor FP8; the runtime fuses them into one GEMM"
                )
            weight = weights[0] if len(weights) == 1 else torch.cat(weights)
            self.weight_bytes += sum(c.nbytes for c in channel)
            return RowwiseFp8Linear(
                self.resident(weight), torch.cat(channel), self.fp8_gemm, self.dtype, row_multiple
            )
        scales = [
            tuple(self.tensor(rank, n).float() for n in scale_names(f"{m}.weight")) for m in names
        ]
        for m, (w_scale, a_scale) in zip(names[1:], scales[1:], strict=True):
            if not (torch.equal(w_scale, scales[0][0]) and torch.equal(a_scale, scales[0][1])):
                raise UserError(
                    f"{rank_file_name(rank)}: {m} scales differ from {module}'s; "
                    "the runtime fuses them into one FP8 GEMM"
                )
        weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        return Fp8Linear(
            self.resident(weight), *scales[0], self.fp8_gemm, self.dtype, row_multiple, self.gemv
        )

    def source_weight(self, rank: int, module: str) -> torch.Tensor:
        try:
            return self.source(rank, f"{module}.weight").to(self.device)
        except KeyError:
            raise UserError(
                f"{rank_file_name(rank)}: tensor {module + '.weight'!r} missing"
            ) from None

    def resident(self, weight: torch.Tensor) -> torch.Tensor:
        weight = weight.contiguous()
        self.weight_bytes += weight.nbytes
        return weight

    def build_block(self, layer: LayerPlan, local: int, ranks: list[int]) -> list[Part]:
        """The block's parts, decided here once: attention or its linear, then MLP or linear."""
        eps, parts = self.plan.rms_norm_eps, []
        attention, ffn = layer.attention, layer.ffn
        if attention is not AttentionKind.NO_OP:
            norm = self.tensor(ranks[0], trtllm_weight(Role.ATTN_NORM, local), self.dtype)
            if attention is AttentionKind.ATTENTION:
                work, combine = [self.attention_rank(layer, local, r) for r in ranks], all_reduce
            else:
                linear = trtllm_module(Role.ATTN_LINEAR, local)
                work = [LinearRank(self.linear(r, linear)) for r in ranks]
                combine = self.gather_combine(layer)
            parts.append(
                Part(f"layer {layer.index} attention", norm, work, combine, self.kernels, eps)
            )
        if ffn is not FfnKind.NO_OP:
            norm = self.tensor(ranks[0], trtllm_weight(Role.FFN_NORM, local), self.dtype)
            if ffn is FfnKind.MLP:
                # gate and up read the same input: one GEMM over their stacked rows
                fc, gate = (trtllm_module(role, local) for role in fused_roles(Group.GATE_UP))
                proj = trtllm_module(Role.FFN_DOWN, local)
                work = [
                    MlpRank(self.linear(r, fc, fuse=[gate]), self.linear(r, proj), self.kernels)
                    for r in ranks
                ]
                combine = all_reduce
            else:
                linear = trtllm_module(Role.FFN_LINEAR, local)
                work = [LinearRank(self.linear(r, linear)) for r in ranks]
                combine = self.gather_combine(layer)
            parts.append(Part(f"layer {layer.index} ffn", norm, work, combine, self.kernels, eps))
        for part in parts:
            self.check_shared_scales(part, layer)
        return parts

    def gather_combine(self, layer: LayerPlan) -> Callable[[list[torch.Tensor]], torch.Tensor]:
        if self.rank is not None and self.tp > 1:
            raise UserError(
                f"layer {layer.index}: a linear-replacement block needs its all-gather; "
                "run every rank (rank=None) for this checkpoint"
            )
        return all_gather

    @staticmethod
    def check_shared_scales(part: Part, layer: LayerPlan) -> None:
        """The ranks share one quantized input: their first linears' activation scales must
        agree."""
        scales = [w.first.a_scale for w in part.ranks]
        if scales[0] is not None and any(not torch.equal(s, scales[0]) for s in scales[1:]):
            raise UserError(f"layer {layer.index}: activation_scaling_factor differs between ranks")

    def attention_rank(self, layer: LayerPlan, local: int, rank: int) -> AttentionRank:
        hd = self.plan.head_dim
        q_heads = self.plan.num_attention_heads // self.tp
        kv_heads = kv_heads_per_rank(layer.kv_heads, self.tp)
        kv_scale = None
        if self.kv_cache_fp8:
            kv_scale = self.tensor(rank, kv_cache_scale_name(local)).float()
        shape = (self.max_batch, kv_heads, self.max_seq, hd)
        cache = (
            torch.zeros(shape, dtype=self.dtype, device=self.device),
            torch.zeros(shape, dtype=self.dtype, device=self.device),
        )
        return AttentionRank(
            self.linear(rank, trtllm_module(Role.ATTN_Q, local)),
            self.linear(rank, trtllm_module(Role.ATTN_OUT, local)),
            q_heads,
            kv_heads,
            hd,
            kv_scale,
            cache,
            self.kernels,
        )

    # ---- sizes ------------------------------------------------------------------------------
    @property
    def linear_bytes(self) -> int:
        """Bytes of every resident linear weight (what a decode step streams), lm_head included."""
        return sum(lin.nbytes for lin in self.all_linears())

    def all_linears(self) -> list[Linear]:
        return [
            *self.lm_head,
            *(lin for part in self.parts for w in part.ranks for lin in linears_of(w)),
        ]

    def drop_graphs(self) -> None:
        self._graphs.clear()
        self._pool = None  # a pool whose graphs were freed is not captured into again

    def set_gemv(self, enabled: bool) -> None:
        """Route one-row linears through the Triton kernel (True) or cuBLAS; drops captured
        graphs."""
        enabled = enabled and matvec.available()
        for lin in self.all_linears():
            lin.gemv = enabled and not getattr(lin, "emulate", False)
        self.gemv = enabled
        self.drop_graphs()

    def set_pdl(self, enabled: bool) -> None:
        """Launch the Triton kernels (where they run) with programmatic dependent launch: each
        may start while the one before finishes; drops captured graphs."""
        self.kernels.set_pdl(enabled and pdl_supported(self.device))
        for lin in self.all_linears():
            lin.pdl = self.pdl
        self.drop_graphs()

    @property
    def pdl(self) -> bool:
        return self.kernels.pdl

    def set_fused_decode_attention(self, enabled: bool) -> None:
        """Decode attention as the tiled Triton kernels (True, where Triton runs) or the eager
        GEMM-softmax-GEMM; drops captured graphs."""
        if enabled and self.kernels.rope_cache is not None:
            self.kernels.use_triton("decode_attention")
        else:
            self.kernels.decode_attention = None
        self.drop_graphs()

    def fp8_linears(self) -> list[tuple[str, Fp8Linear]]:
        """(part name, linear) of every FP8 linear, for checks of the GEMM paths."""
        return [
            (part.name, lin)
            for part in self.parts
            for work in part.ranks
            for lin in linears_of(work)
            if isinstance(lin, Fp8Linear)
        ]

    @property
    def caches(self) -> list[AttentionRank]:
        return [w for part in self.parts for w in part.ranks if isinstance(w, AttentionRank)]

    def kv_bytes_read(self, batch: int, span: int) -> int:
        """Cache bytes one decode step reads (k and v up to `span`, every attention rank)."""
        per = torch.finfo(self.dtype).bits // 8
        return sum(2 * batch * c.kv_heads * span * c.head_dim * per for c in self.caches)

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, step: Step) -> torch.Tensor:
        x = F.embedding(ids, self.embedding)
        delta = torch.zeros_like(x)
        for part in self.parts:
            x, delta = part(x, delta, step)
        x, h = self.kernels.add_norm(x, delta, self.final_norm, self.plan.rms_norm_eps)
        if self.lm_head[0].a_scale is not None:
            h = self.kernels.quantize(h, self.lm_head[0].a_scale)
        logits = all_gather([head(h) for head in self.lm_head])
        if self.rank is None:
            logits = logits[..., : self.plan.vocab_size]
        return logits.float()

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [batch, seq, vocab] of the prompts `ids` [batch, seq]; the cache then holds
        them."""
        ids = ids.to(self.device)
        batch, seq = ids.shape
        if batch > self.max_batch or seq >= self.max_seq:
            raise UserError(
                f"prompt batch {batch} x {seq} tokens: the cache holds "
                f"{self.max_batch} x {self.max_seq - 1} (max_batch, max_seq - 1)"
            )
        step = Step(
            self.cos[:seq], self.sin[:seq], decode=False, batch=batch, tables=(self.cos, self.sin)
        )
        logits = self.forward(ids, step)
        self.pos.fill_(seq)
        self.length, self.batch = seq, batch
        return logits

    def span_for(self, length: int) -> int:
        """Cache span a decode step at position `length` attends over (a power of two)."""
        return min(self.max_seq, max(MIN_SPAN, 1 << length.bit_length()))

    def decode_step(self, ids: torch.Tensor, span: int) -> torch.Tensor:
        """One decode step at position self.pos (a device tensor, so graphs replay it)."""
        fused_rope = self.kernels.rope_cache is not None  # reads the tables at pos itself
        cos, sin = (
            (None, None)
            if fused_rope
            else (self.cos.index_select(0, self.pos), self.sin.index_select(0, self.pos))
        )
        step = Step(
            cos,
            sin,
            decode=True,
            batch=ids.shape[0],
            pos=self.pos,
            span=span,
            valid=self.positions[:span] <= self.pos,
            tables=(self.cos, self.sin),
        )
        logits = self.forward(ids[:, None], step)[:, 0]
        self.pos.add_(1)
        return logits

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [batch, vocab] after appending token `ids` [batch] to every sequence."""
        if self.length == 0 or ids.shape[0] != self.batch:
            raise UserError(
                f"decode of {ids.shape[0]} sequences: prefill {self.batch or 'none'} first"
            )
        if self.length >= self.max_seq:
            raise UserError(f"the cache is full ({self.max_seq} tokens)")
        span = self.span_for(self.length)
        ids = ids.to(self.device)
        if self.graphs_enabled:
            graph = self._graphs.get((self.batch, span)) or self.capture(self.batch, span)
            graph.ids.copy_(ids)
            graph.graph.replay()
            logits = graph.logits.clone()
        else:
            logits = self.decode_step(ids, span)
        self.length += 1
        return logits

    def capture(self, batch: int, span: int) -> Graph:
        """Capture the decode step for (batch, span) as a CUDA graph (warmed up first)."""
        ids = torch.zeros(batch, dtype=torch.long, device=self.device)
        saved = self.pos.clone()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile and autotune outside the capture
                self.decode_step(ids, span)
                self.pos.copy_(saved)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.decode_step(ids, span)
        self.pos.copy_(saved)  # the warm-up and capture wrote only beyond the valid positions
        self._graphs[(batch, span)] = captured = Graph(graph, ids, logits)
        return captured

    def replay_ms(self, graph: Graph, replays: int) -> float:
        """Mean time (ms) of `replays` back-to-back replays of a captured decode step; the
        position is put back where it was (each replay steps it), so the cache is unchanged
        beyond the valid positions."""
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(replays):
            graph.graph.replay()
        end.record()
        end.synchronize()
        self.pos.fill_(self.length)
        return begin.elapsed_time(end) / replays

    @torch.no_grad()
    def tune_decode_linears(
        self, rounds: int = 3, replays: int = 8, margin: float = 1e-3
    ) -> list[LinearTrial]:
        """Choose each skinny linear's path (cuBLAS or the Triton kernel) by the time of the
        captured decode step it runs in, at the prefilled batch and position: timed alone with
        the L2 flushed, a GEMM ranks differently than between the step's other kernels
        (scripts/results/h200_probe_gemm_in_graph_2026-12-02.json). One shape at a time, the
        largest first: the step with the other path against the step as it is, `rounds`
        interleaved medians of `replays` replays; the other path is kept where it is more than
        `margin` faster. Sets matvec.CHOOSER.overrides (per shape, like every choice)."""
        if not (self.graphs_enabled and self.gemv) or self.length == 0:
            raise UserError(
                "tune_decode_linears: needs CUDA graphs, the Triton kernels and a prefill"
            )
        span = self.span_for(self.length)
        replays = min(replays, span - self.length, self.max_seq - self.length)
        if replays < 1:
            raise UserError("tune_decode_linears: no room left in this decode span")
        self.drop_graphs()
        with matvec.CHOOSER.recording() as keys:
            current = self.capture(self.batch, span)

        def step_ms(graph: Graph) -> float:
            return self.replay_ms(graph, replays)

        chooser, trials = matvec.CHOOSER, []
        for key in sorted(keys, key=lambda k: -max(chooser.times_us[k].values())):
            kept = chooser.choice(key)
            for other in chooser.times_us[key]:
                if other == kept:
                    continue
                chooser.overrides[key] = other
                self.drop_graphs()
                trial = self.capture(self.batch, span)
                times: dict[str, list[float]] = {kept: [], other: []}
                for _ in range(rounds):
                    times[kept].append(step_ms(current))
                    times[other].append(step_ms(trial))
                medians = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
                if medians[other] < medians[kept] * (1 - margin):
                    kept, current = other, trial
                chooser.overrides[key] = kept
                trials.append(LinearTrial(key, medians, kept))
        self.drop_graphs()
        return trials

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, steps: int) -> torch.Tensor:
        """Greedy continuation: `steps` new tokens per prompt, [batch, steps]."""
        ids = ids[None] if ids.dim() == 1 else ids
        token = self.prefill(ids)[:, -1].argmax(-1)
        out = [token]
        for _ in range(steps - 1):
            token = self.decode(token).argmax(-1)
            out.append(token)
        return torch.stack(out, dim=1).cpu()

    @torch.no_grad()
    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> Generation:
        """`TrtllmCheckpointExecutor.greedy`'s contract for a static batch (what `builder bench`
        drives): exactly `max_new_tokens` tokens per prompt, the time each step's tokens
        reached the host, and the KV cache's size. Prompts must share one length (decode steps
        share one position)."""
        if not prompts or any(not p for p in prompts):
            raise UserError("generate: every prompt needs at least one token")
        if max_new_tokens < 1:
            raise UserError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
        if len({len(p) for p in prompts}) != 1:
            raise UserError(
                "resident runtime: prompts of one length only (a static batch), got lengths "
                + ", ".join(sorted({str(len(p)) for p in prompts}))
            )
        if len(prompts[0]) + max_new_tokens > self.max_seq:
            raise UserError(
                f"{len(prompts[0])} prompt + {max_new_tokens} new tokens: the cache holds "
                f"{self.max_seq} (max_seq)"
            )
        start = time.perf_counter()
        token = self.prefill(torch.tensor(prompts))[:, -1].argmax(-1)
        steps, times = [token.tolist()], [time.perf_counter()]  # tolist waits for the device
        for _ in range(max_new_tokens - 1):
            token = self.decode(token).argmax(-1)
            steps.append(token.tolist())
            times.append(time.perf_counter())
        tokens = [list(sequence) for sequence in zip(*steps, strict=True)]
        return Generation(tokens, start, tuple(times), [], self.kv_cache_bytes)

    @property
    def kv_cache_bytes(self) -> int:
        return sum(c.k_cache.nbytes + c.v_cache.nbytes for c in self.caches)

    def __enter__(self) -> ResidentRuntime:
        return self

    def __exit__(self, *exc) -> None:
        self.drop_graphs()
