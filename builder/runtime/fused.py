"""Triton kernels for the elementwise chains that cost the most: the residual add + RMSNorm
(+ FP8 quantization of its output) before each part, SiLU(fc) x gate (+ quantization) before
proj, and the split of qkv with the rotary embedding, writing k and v into the KV cache.

Each is one pass: the norm kernel holds a whole row in registers (one program per row), reads
x and the pending residual once and writes the new residual and the normalized (or e4m3)
row; the SiLU kernel reads fc|gate once and writes the product. The roundings are the
executor's, in its order: the residual sum is rounded to the compute dtype, the fp32 norm is
rounded to it before the weight multiply, that product is rounded again, and the quantization
divides by the activation scale, clamps to +-448 and rounds to e4m3 (nearest even). torch.compile
generated the norm chain with dynamic shapes at a fraction of the bandwidth (1.1 ms for one
16384 x 16384 bf16 norm on an H200); this kernel takes 0.48 ms (scripts/bench_gpu.py profiles).
"""

from __future__ import annotations

import functools

import torch

from builder.dtypes import FP8_MAX


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def add_rms_norm(
        x_ptr,
        d_ptr,
        w_ptr,
        x_out_ptr,
        h_ptr,
        scale_ptr,
        H,
        eps,
        BLOCK: tl.constexpr,
        QUANT: tl.constexpr,
        FP8_MAX: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64) * H
        cols = tl.arange(0, BLOCK)
        ok = cols < H
        dtype = x_out_ptr.dtype.element_ty
        x = tl.load(x_ptr + row + cols, mask=ok, other=0.0).to(tl.float32)
        d = tl.load(d_ptr + row + cols, mask=ok, other=0.0).to(tl.float32)
        xs = (x + d).to(dtype, fp_downcast_rounding="rtne")
        tl.store(x_out_ptr + row + cols, xs, mask=ok)
        x32 = xs.to(tl.float32)
        inv = tl.rsqrt(tl.sum(x32 * x32, axis=0) / H + eps)
        normed = (x32 * inv).to(dtype, fp_downcast_rounding="rtne").to(tl.float32)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        out = (w * normed).to(dtype, fp_downcast_rounding="rtne")
        if QUANT:
            q = out.to(tl.float32) / tl.load(scale_ptr)
            q = tl.minimum(tl.maximum(q, -FP8_MAX), FP8_MAX)
            tl.store(
                h_ptr + row + cols,
                q.to(h_ptr.dtype.element_ty, fp_downcast_rounding="rtne"),
                mask=ok,
            )
        else:
            tl.store(h_ptr + row + cols, out, mask=ok)

    @triton.jit
    def silu_mul(
        fg_ptr,
        out_ptr,
        scale_ptr,
        W,
        BLOCK: tl.constexpr,
        QUANT: tl.constexpr,
        FP8_MAX: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < W
        dtype = fg_ptr.dtype.element_ty
        a = tl.load(fg_ptr + row * 2 * W + cols, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(fg_ptr + row * 2 * W + W + cols, mask=ok, other=0.0).to(tl.float32)
        silu = (a / (1.0 + tl.exp(-a))).to(dtype, fp_downcast_rounding="rtne").to(tl.float32)
        out = (silu * b).to(dtype, fp_downcast_rounding="rtne")
        if QUANT:
            q = out.to(tl.float32) / tl.load(scale_ptr)
            q = tl.minimum(tl.maximum(q, -FP8_MAX), FP8_MAX)
            tl.store(
                out_ptr + row * W + cols,
                q.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"),
                mask=ok,
            )
        else:
            tl.store(out_ptr + row * W + cols, out, mask=ok)

    @triton.jit
    def rope_cache(
        qkv_ptr,
        cos_ptr,
        sin_ptr,
        pos_ptr,
        q_ptr,
        k_cache_ptr,
        v_cache_ptr,
        kv_scale_ptr,
        S,
        QH,
        KVH,
        MAX_SEQ,
        CACHE_BATCH_STRIDE,
        HD: tl.constexpr,
        DECODE: tl.constexpr,
        FP8_KV: tl.constexpr,
        FP8_MAX: tl.constexpr,
    ):
        token = tl.program_id(0)
        head = tl.program_id(1)
        b, s = token // S, token % S
        pos = tl.load(pos_ptr) if DECODE else s
        half = tl.arange(0, HD // 2)
        dtype = q_ptr.dtype.element_ty
        row = qkv_ptr + token.to(tl.int64) * (QH + 2 * KVH) * HD + head * HD
        x1 = tl.load(row + half)
        x2 = tl.load(row + HD // 2 + half)
        if head < QH + KVH:  # rotate-half (rope_gpt_neox): x * cos + cat(-x2, x1) * sin
            c1 = tl.load(cos_ptr + pos * HD + half).to(tl.float32)
            c2 = tl.load(cos_ptr + pos * HD + HD // 2 + half).to(tl.float32)
            s1 = tl.load(sin_ptr + pos * HD + half).to(tl.float32)
            s2 = tl.load(sin_ptr + pos * HD + HD // 2 + half).to(tl.float32)
            a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
            o1 = (
                (a1 * c1).to(dtype, fp_downcast_rounding="rtne").to(tl.float32)
                + (-a2 * s1).to(dtype, fp_downcast_rounding="rtne").to(tl.float32)
            ).to(dtype, fp_downcast_rounding="rtne")
            o2 = (
                (a2 * c2).to(dtype, fp_downcast_rounding="rtne").to(tl.float32)
                + (a1 * s2).to(dtype, fp_downcast_rounding="rtne").to(tl.float32)
            ).to(dtype, fp_downcast_rounding="rtne")
        else:
            o1, o2 = x1, x2
        if head >= QH and FP8_KV:  # the FP8 KV cache's values: e4m3(x / scale) * scale
            scale = tl.load(kv_scale_ptr)
            o1 = (
                tl.minimum(tl.maximum(o1.to(tl.float32) / scale, -FP8_MAX), FP8_MAX)
                .to(tl.float8e4nv, fp_downcast_rounding="rtne")
                .to(tl.float32)
                * scale
            ).to(dtype)
            o2 = (
                tl.minimum(tl.maximum(o2.to(tl.float32) / scale, -FP8_MAX), FP8_MAX)
                .to(tl.float8e4nv, fp_downcast_rounding="rtne")
                .to(tl.float32)
                * scale
            ).to(dtype)
        if head < QH:
            out = q_ptr + ((b * QH + head) * S + s).to(tl.int64) * HD
        elif head < QH + KVH:
            out = (
                k_cache_ptr
                + b.to(tl.int64) * CACHE_BATCH_STRIDE
                + ((head - QH) * MAX_SEQ + pos) * HD
            )
        else:
            out = (
                v_cache_ptr
                + b.to(tl.int64) * CACHE_BATCH_STRIDE
                + ((head - QH - KVH) * MAX_SEQ + pos) * HD
            )
        tl.store(out + half, o1)
        tl.store(out + HD // 2 + half, o2)

    return add_rms_norm, silu_mul, rope_cache


def add_norm(x, delta, weight, eps, a_scale=None):
    """(x + delta, rms_norm(x + delta) * weight [as e4m3 / a_scale]) in one pass."""
    import triton

    hidden = x.shape[-1]
    rows = x.numel() // hidden
    x_out = torch.empty_like(x)
    h = torch.empty(
        x.shape, dtype=torch.float8_e4m3fn if a_scale is not None else x.dtype, device=x.device
    )
    block = triton.next_power_of_2(hidden)
    warps = max(4, min(32, block // 512))
    x, delta = x.contiguous(), delta.contiguous()
    _kernels()[0][(rows,)](
        x,
        delta,
        weight,
        x_out,
        h,
        a_scale if a_scale is not None else weight,
        hidden,
        eps,
        BLOCK=block,
        QUANT=a_scale is not None,
        FP8_MAX=FP8_MAX,
        num_warps=warps,
    )
    return x_out, h


def add_norm_quant(x, delta, weight, eps, a_scale):
    return add_norm(x, delta, weight, eps, a_scale)


def silu_mul(fc_gate, width, a_scale=None):
    """silu(fc_gate[..., :width]) * fc_gate[..., width:] [as e4m3 / a_scale], one pass."""
    import triton

    rows = fc_gate.numel() // (2 * width)
    out = torch.empty(
        *fc_gate.shape[:-1],
        width,
        device=fc_gate.device,
        dtype=torch.float8_e4m3fn if a_scale is not None else fc_gate.dtype,
    )
    block = 1024
    grid = (rows, triton.cdiv(width, block))
    _kernels()[1][grid](
        fc_gate.contiguous(),
        out,
        a_scale if a_scale is not None else fc_gate,
        width,
        BLOCK=block,
        QUANT=a_scale is not None,
        FP8_MAX=FP8_MAX,
        num_warps=4,
    )
    return out


def silu_mul_quant(fc_gate, width, a_scale):
    return silu_mul(fc_gate, width, a_scale)


def rope_cache(
    qkv, cos, sin, pos, k_cache, v_cache, q_heads, kv_heads, head_dim, kv_scale=None, decode=False
):
    """q [batch, q_heads, seq, head_dim] rotated; k (rotated) and v written into the caches at
    positions 0..seq-1 (prefill) or at `pos` (decode, seq 1), FP8-rounded when `kv_scale`."""
    batch, seq, _ = qkv.shape
    q = torch.empty(batch, q_heads, seq, head_dim, dtype=qkv.dtype, device=qkv.device)
    _kernels()[2][(batch * seq, q_heads + 2 * kv_heads)](
        qkv.contiguous(),
        cos,
        sin,
        pos,
        q,
        k_cache,
        v_cache,
        kv_scale if kv_scale is not None else cos,
        seq,
        q_heads,
        kv_heads,
        k_cache.shape[2],
        k_cache.stride(0),
        HD=head_dim,
        DECODE=decode,
        FP8_KV=kv_scale is not None,
        FP8_MAX=FP8_MAX,
        num_warps=1,
    )
    return q
