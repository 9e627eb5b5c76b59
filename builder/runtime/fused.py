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

`pdl=True` launches a kernel with programmatic dependent launch (Hopper and later): it may be
scheduled while the kernel before it still runs, and each program waits for that kernel's
results (`after_producers`) before its first dependent load and before any store. A decode
step is a chain of about 90 short kernels, so what this hides is each one's launch and ramp-up.
"""

from __future__ import annotations

import functools

import torch

from builder.dtypes import FP8_MAX


def pdl_launch(pdl: bool) -> dict[str, bool]:
    """A kernel's launch arguments for programmatic dependent launch: the launch attribute and
    the kernel's own wait (`GDC`) go together, since a kernel launched early that does not
    wait could read its producer's output before it is written."""
    return {"GDC": pdl, "launch_pdl": pdl}


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def after_producers(GDC: tl.constexpr):
        # under programmatic dependent launch: wait until the kernels before have finished and
        # flushed (every program waits before its first dependent load and before any store,
        # so the guarantee also covers the kernels further back), then let the next kernel be
        # scheduled so its launch and prologue overlap this one
        if GDC:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

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
        GDC: tl.constexpr,
    ):
        after_producers(GDC)
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
        GDC: tl.constexpr,
    ):
        after_producers(GDC)
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
        GDC: tl.constexpr,
    ):
        after_producers(GDC)
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

    @triton.jit
    def attend_tile(
        q_ptr,
        k_cache_ptr,
        v_cache_ptr,
        valid_ptr,
        m_ptr,
        l_ptr,
        acc_ptr,
        TILES,
        QH,
        KVH,
        MAX_SEQ,
        CACHE_BATCH_STRIDE,
        sm_scale,
        GROUP: tl.constexpr,
        HD: tl.constexpr,
        BLOCK_S: tl.constexpr,
        GDC: tl.constexpr,
    ):
        after_producers(GDC)
        # one (sequence, kv head, tile of BLOCK_S cache positions): the kv head's GROUP query
        # heads at once (rows padded to the 16 a tensor-core dot needs), one read of keys and
        # values; writes the tile's maximum, sum and unnormalized weighted values
        b, kv, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = tl.arange(0, GROUP)
        groups = QH // KVH
        row_ok = rows < groups
        d = tl.arange(0, HD)
        pos = tile * BLOCK_S + tl.arange(0, BLOCK_S)
        dtype = q_ptr.dtype.element_ty
        heads = kv * groups + rows
        q = tl.load(
            q_ptr + (b * QH + heads).to(tl.int64)[:, None] * HD + d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        base = b.to(tl.int64) * CACHE_BATCH_STRIDE + kv.to(tl.int64) * MAX_SEQ * HD
        at = base + pos[:, None] * HD + d[None, :]
        keys = tl.load(k_cache_ptr + at)
        scores = tl.dot(q, tl.trans(keys))  # [GROUP, BLOCK_S], fp32
        # the eager path's scores are a bf16 GEMM output: round alike before scaling
        scores = scores.to(dtype, fp_downcast_rounding="rtne").to(tl.float32) * sm_scale
        valid = tl.load(valid_ptr + pos) != 0
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m = tl.max(scores, axis=1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)  # a tile with no valid position
        p = tl.exp(scores - m_safe[:, None])
        total = tl.sum(p, axis=1)
        values = tl.load(v_cache_ptr + at)
        acc = tl.dot(p.to(dtype, fp_downcast_rounding="rtne"), values)  # [GROUP, HD], fp32
        slot = ((b * KVH + kv) * TILES + tile).to(tl.int64) * GROUP + rows
        tl.store(m_ptr + slot, m)
        tl.store(l_ptr + slot, total)
        tl.store(acc_ptr + slot[:, None] * HD + d[None, :], acc)

    @triton.jit
    def combine_tiles(
        m_ptr,
        l_ptr,
        acc_ptr,
        q_ptr,
        out_ptr,
        a_scale_ptr,
        TILES,
        QH,
        KVH,
        GROUP: tl.constexpr,
        HD: tl.constexpr,
        QUANT: tl.constexpr,
        FP8_MAX: tl.constexpr,
        GDC: tl.constexpr,
    ):
        after_producers(GDC)
        # one (sequence, query head): the softmax over all tiles, rescaled to the overall
        # maximum (tile 0 holds position 0, always valid, so that maximum is finite)
        b, head = tl.program_id(0), tl.program_id(1)
        groups = QH // KVH
        kv, row = head // groups, head % groups
        d = tl.arange(0, HD)
        first = ((b * KVH + kv) * TILES).to(tl.int64) * GROUP + row
        m_all = tl.full([], float("-inf"), tl.float32)
        for t in range(0, TILES):
            m_all = tl.maximum(m_all, tl.load(m_ptr + first + t * GROUP))
        total = tl.full([], 0.0, tl.float32)
        acc = tl.zeros((HD,), dtype=tl.float32)
        for t in range(0, TILES):
            w = tl.exp(tl.load(m_ptr + first + t * GROUP) - m_all)
            total += w * tl.load(l_ptr + first + t * GROUP)
            acc += w * tl.load(acc_ptr + (first + t * GROUP) * HD + d)
        out = (acc / total).to(q_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        at = out_ptr + (b * QH + head).to(tl.int64) * HD + d
        if QUANT:  # the dense linear's e4m3 input, as `quantize` rounds it
            x = tl.minimum(tl.maximum(out.to(tl.float32) / tl.load(a_scale_ptr), -FP8_MAX), FP8_MAX)
            tl.store(at, x.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"))
        else:
            tl.store(at, out)

    return add_rms_norm, silu_mul, rope_cache, attend_tile, combine_tiles


def add_norm(x, delta, weight, eps, a_scale=None, pdl=False):
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
        **pdl_launch(pdl),
    )
    return x_out, h


def add_norm_quant(x, delta, weight, eps, a_scale, pdl=False):
    return add_norm(x, delta, weight, eps, a_scale, pdl)


def silu_mul(fc_gate, width, a_scale=None, pdl=False):
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
        **pdl_launch(pdl),
    )
    return out


def silu_mul_quant(fc_gate, width, a_scale, pdl=False):
    return silu_mul(fc_gate, width, a_scale, pdl)


def rope_cache(
    qkv,
    cos,
    sin,
    pos,
    k_cache,
    v_cache,
    q_heads,
    kv_heads,
    head_dim,
    kv_scale=None,
    decode=False,
    pdl=False,
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
        **pdl_launch(pdl),
    )
    return q


DECODE_TILE = 64  # cache positions per program of the decode attention


def decode_attention(q, k_cache, v_cache, valid, scale, kv_heads, a_scale=None, pdl=False):
    """One decode step's attention of q [batch, q_heads, 1, head_dim] over the caches'
    positions where `valid` [span] is True, as [batch, 1, q_heads * head_dim] (e4m3 of
    out / a_scale when given: the dense linear's input), in two kernels instead of four
    (scores, softmax, weighted values, quantization).

    Split by cache tile (flash-decoding): each program takes one tile of one sequence's kv
    head for all the query heads that read it (tensor-core dots), and writes the tile's
    maximum, sum and unnormalized weighted values; a second kernel rescales the tiles to the
    overall maximum and normalizes. Roundings: the scores are rounded to the compute dtype
    as the eager path's GEMM output is, the softmax is fp32, the tile's unnormalized
    probabilities are rounded to the compute dtype for the values' dot (the eager path rounds
    the normalized ones), and the output once."""
    import triton

    batch, q_heads, _, head_dim = q.shape
    span = valid.shape[0]
    if span % DECODE_TILE:
        raise ValueError(f"decode span {span} is not a multiple of {DECODE_TILE}")
    tiles = span // DECODE_TILE
    group = max(16, triton.next_power_of_2(q_heads // kv_heads))
    m = torch.empty(batch, kv_heads, tiles, group, dtype=torch.float32, device=q.device)
    total = torch.empty_like(m)
    acc = torch.empty(*m.shape, head_dim, dtype=torch.float32, device=q.device)
    attend, combine = _kernels()[3:]
    attend[(batch, kv_heads, tiles)](
        q.contiguous(),
        k_cache,
        v_cache,
        valid,
        m,
        total,
        acc,
        tiles,
        q_heads,
        kv_heads,
        k_cache.shape[2],
        k_cache.stride(0),
        scale,
        GROUP=group,
        HD=head_dim,
        BLOCK_S=DECODE_TILE,
        num_warps=4,
        **pdl_launch(pdl),
    )
    out = torch.empty(
        batch,
        1,
        q_heads * head_dim,
        dtype=torch.float8_e4m3fn if a_scale is not None else q.dtype,
        device=q.device,
    )
    combine[(batch, q_heads)](
        m,
        total,
        acc,
        q,  # (only its dtype: the compute dtype the output is rounded to)
        out,
        a_scale if a_scale is not None else m,
        tiles,
        q_heads,
        kv_heads,
        GROUP=group,
        HD=head_dim,
        QUANT=a_scale is not None,
        FP8_MAX=FP8_MAX,
        num_warps=1,
        **pdl_launch(pdl),
    )
    return out
