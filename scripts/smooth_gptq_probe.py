#!/usr/bin/env python
"""Do SmoothQuant-style channel scaling or GPTQ rounding lower the FP8 error on SmolLM2?

Both keep the two export formats standard: smoothing folds into the checkpoint (no new
tensor), GPTQ only picks other E4M3 values at the format's own scales. This script measures
them before anything is wired in: one block-streamed pass, as calibration runs, where each
*stream* is a format plus a transform of every block:

  none           the format as `builder quantize` applies it today (round to nearest);
  smooth=ALPHA   SmoothQuant (Xiao et al. 2023): for a linear's input channel j,
                 s_j = max|x_j|^alpha / max|W[:, j]|^(1 - alpha) over the calibration
                 activations, x_j / s_j and W[:, j] * s_j, the 1/s folded into the op before:
                 input_layernorm gamma for q/k/v, post_attention_layernorm gamma for
                 gate/up (one s for the linears reading that norm), up_proj rows for
                 down_proj (silu(gate) * up is linear in up), v_proj rows for o_proj; with
                 GQA one v channel feeds `groups` o_proj channels, so s is taken over them
                 (max of the activation and weight maxima over the group) and shared;
  placebo=SEED   the same fold with random scales 2^U(-1/2, 1/2) per channel: E4M3 rounding
                 is scale-invariant up to the grid position, so a smoothing gain smaller
                 than the placebo's spread is no gain;
  gptq           GPTQ (Frantar et al. 2022) rounding of each linear's weight at the format's
                 fixed scales (per-channel row amax / 448, or the per-tensor amax / 448),
                 H = X^T X from the calibration activations entering the linear (1% damping);
  smooth=ALPHA+gptq  both;
  bf16of=RECIPE  the recipe's BF16 (and W8A16) units in BF16, every other linear in the stream's
                 format (recipe=RECIPE instead gives each linear the recipe's own format);
  exactw         the weights left exact (BF16) and only the activations quantized as the
                 format does (per-tensor static or per-token): the error no choice of weight
                 codes can remove, the floor under GPTQ for the same BF16 units.

Formats: fp8 (per-tensor W and static A), fp8-pc-pt (per-channel W, per-token A), wonly
(per-channel FP8 weights, activations left in BF16: the share of the error that is weights),
int8wo (per-channel INT8 weights, BF16 activations: W8A16), int8sq (per-channel INT8 weights,
per-token INT8 activations: TensorRT-LLM's W8A8 SmoothQuant GEMM, with smooth=ALPHA),
fp8-block (E4M3 weights with one scale per 128 x 128 block and activations with one per 1 x 128
group of each token: TensorRT-LLM's FP8_BLOCK_SCALES; round to nearest),
bf16 (the transform alone: the fold's own bf16 rounding).

At each block the calibration states run through the BF16 reference block, whose hooks give
every linear's per-channel input maxima (and Hessians for gptq); then each stream's block is
loaded in fp32, transformed, cast to bf16, quantized and run on that stream's held-out
states. Scores as scripts/auto_quantize_pareto.py's: mean KL(BF16 || stream) over the full
vocabulary, p99, top-1 agreement, on `builder reference`'s held-out windows.

  nice .venv/bin/python scripts/smooth_gptq_probe.py --work /tmp/probe \\
      --streams fp8-pc-pt:none,fp8-pc-pt:smooth=0.5,fp8-pc-pt:gptq --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
# linears reading one tensor share its statistics (and a per-tensor input scale)
READS = {
    "self_attn.k_proj": "self_attn.q_proj",
    "self_attn.v_proj": "self_attn.q_proj",
    "mlp.up_proj": "mlp.gate_proj",
}
FORMATS = ("fp8", "fp8-pc-pt", "fp8-block", "wonly", "int8wo", "int8sq", "bf16")
INT8_MAX = 127
DAMP = 0.01  # GPTQ's damping, a fraction of the mean diagonal of H (--damp)
ACT_ORDER = False  # GPTQ columns in decreasing diag(H) (--act-order)
SEQUENTIAL = False  # GPTQ's H from the stream's own (quantized) calibration states (--sequential)
# GPTQ against the per-token FP8 activations (--asymmetric, fp8-pc-pt linears): minimise
# ||X W^T - Xq Q^T|| (X the BF16 input, Xq its per-token E4M3 rounding) instead of
# ||X (W - Q)^T||: GPTQ of the target W X^T Xq (Xq^T Xq)^-1 under H = Xq^T Xq
ASYMMETRIC = False


@dataclass(frozen=True)
class StreamSpec:
    fmt: str
    alpha: float | None = None  # smoothing
    placebo: int | None = None  # random-scale seed
    gptq: bool = False
    recipe: str | None = None  # a builder recipe file: its BF16 units stay BF16
    upgrade: str | None = None  # the format the recipe's BF16 units take instead (upgrade=FMT)
    exact_weights: bool = False  # exactw: only the activations quantized
    bf16_of: str | None = None  # bf16of=RECIPE: its BF16 units stay BF16, the rest take fmt

    @property
    def name(self) -> str:
        parts = []
        if self.alpha is not None:
            parts.append(f"smooth={self.alpha:g}")
        if self.placebo is not None:
            parts.append(f"placebo={self.placebo}")
        if self.recipe is not None:
            parts.append(f"recipe={Path(self.recipe).name}")
        if self.upgrade is not None:
            parts.append(f"upgrade={self.upgrade}")
        if self.gptq:
            parts.append("gptq")
        if self.exact_weights:
            parts.append("exactw")
        if self.bf16_of is not None:
            parts.append(f"bf16of={Path(self.bf16_of).name}")
        return f"{self.fmt}:{'+'.join(parts) or 'none'}"

    @classmethod
    def parse(cls, text: str) -> StreamSpec:
        fmt, _, transform = text.partition(":")
        if fmt not in FORMATS:
            raise SystemExit(f"error: stream {text!r}: format {fmt!r} (choose {FORMATS})")
        alpha = placebo = recipe = upgrade = bf16_of = None
        gptq = exact_weights = False
        for part in filter(None, (transform or "none").split("+")):
            key, _, value = part.partition("=")
            if key == "smooth":
                alpha = float(value)
            elif key == "placebo":
                placebo = int(value)
            elif key == "gptq":
                gptq = True
            elif key == "recipe":
                recipe = value
            elif key == "upgrade":
                upgrade = value
            elif key == "exactw":
                exact_weights = True
            elif key == "bf16of":
                bf16_of = value
            elif key != "none":
                raise SystemExit(f"error: stream {text!r}: unknown transform {key!r}")
        if exact_weights and gptq:
            raise SystemExit(f"error: stream {text!r}: exactw leaves no weight codes to round")
        if bf16_of is not None and recipe is not None:
            raise SystemExit(f"error: stream {text!r}: recipe= or bf16of=, not both")
        return cls(fmt, alpha, placebo, gptq, recipe, upgrade, exact_weights, bf16_of)


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- the statistics of the reference block ----------------------------------------------
@dataclass
class BlockStats:
    xmax: dict[str, torch.Tensor]  # reader linear -> per-input-channel max |x|, fp32
    hessian: dict[str, torch.Tensor]  # reader linear -> X^T X, fp32 (gptq streams only)
    hessian_q: dict[str, torch.Tensor] = field(default_factory=dict)  # Xq^T Xq (--asymmetric)
    cross: dict[str, torch.Tensor] = field(default_factory=dict)  # X^T Xq (--asymmetric)


@torch.no_grad()
def observe(stream, block: nn.Module, hidden: torch.Tensor, hessians: bool):
    """The block's output on `hidden` and its linears' input statistics."""
    from builder.verify.sensitivity import _run

    stats = BlockStats({}, {})
    hooks = []
    for name in dict.fromkeys(READS.get(n, n) for n in LINEARS):

        def hook(_module, inputs, _out, name=name):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            m = x.abs().amax(0)
            stats.xmax[name] = torch.maximum(stats.xmax[name], m) if name in stats.xmax else m
            if hessians:
                h = x.T @ x
                stats.hessian[name] = stats.hessian.get(name, 0) + h
            if hessians and ASYMMETRIC:
                from builder.dtypes import FP8_MAX
                from builder.quantize.fp8 import FP8
                from builder.runtime.executor import token_scales

                t = token_scales(x)
                xq = (x / t).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * t
                stats.hessian_q[name] = stats.hessian_q.get(name, 0) + xq.T @ xq
                stats.cross[name] = stats.cross.get(name, 0) + x.T @ xq

        hooks.append(block.get_submodule(name).register_forward_hook(hook))
    out = _run(stream, block, hidden, 4)
    for h in hooks:
        h.remove()
    return out, stats


# ---- smoothing, folded ------------------------------------------------------------------
def smoothing_scales(xmax: torch.Tensor, wmax: torch.Tensor, spec: StreamSpec) -> torch.Tensor:
    if spec.placebo is not None:
        g = torch.Generator().manual_seed(spec.placebo * 100_003 + xmax.numel())
        return torch.exp2(torch.rand(xmax.shape, generator=g) - 0.5)
    alpha = spec.alpha
    s = xmax.clamp(min=1e-5).pow(alpha) / wmax.clamp(min=1e-5).pow(1 - alpha)
    return torch.where((xmax > 0) & (wmax > 0), s, torch.ones_like(s))


@torch.no_grad()
def fold(block: nn.Module, stats: BlockStats, spec: StreamSpec) -> dict[str, torch.Tensor]:
    """Fold the smoothing of `spec` into fp32 `block` in place; returns each reader linear's
    input scales s (x -> x / s), ones where nothing is folded."""
    scales = {n: torch.ones_like(x) for n, x in stats.xmax.items()}
    if spec.alpha is None and spec.placebo is None:
        return scales
    attn, mlp = block.self_attn, block.mlp
    q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
    wmax = torch.cat([q.weight, k.weight, v.weight]).abs().amax(0)
    s = smoothing_scales(stats.xmax["self_attn.q_proj"], wmax, spec)
    block.input_layernorm.weight.div_(s)
    for linear in (q, k, v):
        linear.weight.mul_(s[None])
    scales["self_attn.q_proj"] = s
    # o_proj's input channel (head h, dim d) reads v channel (h // groups, d)
    kv_heads, head_dim = k.weight.shape[0] // attn.head_dim, attn.head_dim
    groups = q.weight.shape[0] // (kv_heads * head_dim)
    xo = stats.xmax["self_attn.o_proj"].view(kv_heads, groups, head_dim).amax(1)
    wo = o.weight.abs().amax(0).view(kv_heads, groups, head_dim).amax(1)
    so = smoothing_scales(xo, wo, spec)  # [kv_heads, head_dim]
    v.weight.view(kv_heads, head_dim, -1).div_(so[..., None])
    o.weight.view(o.weight.shape[0], kv_heads, groups, head_dim).mul_(so[:, None, :])
    scales["self_attn.o_proj"] = so[:, None, :].expand(kv_heads, groups, head_dim).reshape(-1)
    wmax = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).abs().amax(0)
    s = smoothing_scales(stats.xmax["mlp.gate_proj"], wmax, spec)
    block.post_attention_layernorm.weight.div_(s)
    mlp.gate_proj.weight.mul_(s[None])
    mlp.up_proj.weight.mul_(s[None])
    scales["mlp.gate_proj"] = s
    s = smoothing_scales(stats.xmax["mlp.down_proj"], mlp.down_proj.weight.abs().amax(0), spec)
    mlp.up_proj.weight.div_(s[:, None])
    mlp.down_proj.weight.mul_(s[None])
    scales["mlp.down_proj"] = s
    return scales


# ---- rounding ---------------------------------------------------------------------------
@torch.no_grad()
def gptq(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """GPTQ's E4M3 rounding at fixed scales ([out] or 0-dim), dequantized: the library's
    (builder.quantize.gptq, which `builder quantize --rounding gptq` runs) on one full H."""
    from builder.quantize.gptq import dequantized, gptq_chunk

    codes, _loss = gptq_chunk(weight, hessian, scale, DAMP, ACT_ORDER)
    return dequantized(codes, scale)


@torch.no_grad()
def gptq_int8(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """GPTQ onto the symmetric INT8 grid at per-row `scale` (row amax / 127), dequantized: the
    library's (builder.quantize.gptq, `Grid.INT8`, what `--recipe w8a16 --rounding gptq` runs)."""
    from builder.quantize.gptq import Grid, dequantized, gptq_chunk

    codes, _loss = gptq_chunk(weight, hessian, scale, DAMP, ACT_ORDER, Grid.INT8)
    return dequantized(codes, scale)


class Int8TokenLinear(nn.Module):
    """Dequantized INT8 weights; each input row rounded to INT8 at its own scale (amax / 127)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight32", weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        scale = x32.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / INT8_MAX
        xq = torch.round(x32 / scale).clamp(-INT8_MAX, INT8_MAX) * scale
        return nn.functional.linear(xq, self.weight32).to(x.dtype)


BLOCK = 128  # fp8-block's weight blocks (BLOCK x BLOCK) and activation groups (1 x BLOCK)


def e4m3_blocks(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """`t` [R, C] rounded to E4M3 at one scale (amax / 448) per `rows` x `cols` block."""
    from builder.dtypes import FP8_MAX
    from builder.quantize.fp8 import FP8

    r, c = t.shape
    pad = (-r) % rows, (-c) % cols
    t32 = nn.functional.pad(t.float(), (0, pad[1], 0, pad[0]))
    blocks = t32.reshape(t32.shape[0] // rows, rows, t32.shape[1] // cols, cols)
    scale = (blocks.abs().amax(dim=(1, 3), keepdim=True) / FP8_MAX).clamp_min(1e-12)
    q = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale
    return q.reshape(t32.shape)[:r, :c]


def block_scales(weight: torch.Tensor) -> torch.Tensor:
    """fp8-block's weight scale of every element [out, in]: its 128 x 128 block's amax / 448."""
    from builder.dtypes import FP8_MAX

    r, c = weight.shape
    pad = (-r) % BLOCK, (-c) % BLOCK
    w = nn.functional.pad(weight.float().abs(), (0, pad[1], 0, pad[0]))
    amax = w.reshape(w.shape[0] // BLOCK, BLOCK, w.shape[1] // BLOCK, BLOCK).amax(dim=(1, 3))
    scale = (amax / FP8_MAX).clamp_min(1e-12)
    return scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:r, :c]


def gptq_elementwise_scales(
    weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """GPTQ onto E4M3 at a scale per element (fp8-block's), dequantized: the library's
    (builder.quantize.gptq.gptq_chunk, which takes [out, in] scales)."""
    from builder.quantize.gptq import Grid, dequantized, gptq_chunk

    codes, _loss = gptq_chunk(weight, hessian, scale, DAMP, ACT_ORDER, Grid.E4M3)
    return dequantized(codes, scale)


class BlockFp8Linear(nn.Module):
    """E4M3 weights at one scale per 128 x 128 block; each token's input at one per 128."""

    def __init__(self, weight: torch.Tensor, dequantized: torch.Tensor | None = None):
        super().__init__()
        if dequantized is None:
            dequantized = e4m3_blocks(weight, BLOCK, BLOCK)
        self.register_buffer("weight32", dequantized.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        xq = e4m3_blocks(rows, 1, BLOCK).reshape(x.shape)
        return nn.functional.linear(xq, self.weight32).to(x.dtype)


class DequantizedLinear(nn.Module):
    """Weights already on the E4M3 grid times their scales, activations unquantized."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight32", weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.float(), self.weight32).to(x.dtype)


UNIT_OF = {
    "self_attn.q_proj": "qkv",
    "self_attn.k_proj": "qkv",
    "self_attn.v_proj": "qkv",
    "self_attn.o_proj": "o",
    "mlp.gate_proj": "gate_up",
    "mlp.up_proj": "gate_up",
    "mlp.down_proj": "down",
}


def linear_format(spec: StreamSpec, layer: int, name: str) -> str:
    """The stream's format of one linear: its recipe's, where the stream has a recipe (or
    BF16 where its bf16of recipe says so, else the stream's)."""
    path = spec.recipe or spec.bf16_of
    if path is None:
        return spec.fmt
    from builder.quantize.formats import Recipe

    recipe = Recipe.load(Path(path))
    fmt = recipe.overrides.get(f"{layer}.{UNIT_OF[name]}", recipe.default).value
    if spec.bf16_of is not None:  # the recipe's BF16-compute units (BF16 or W8A16)
        return "bf16" if fmt in ("bf16", "w8a16") else spec.fmt
    return spec.upgrade if fmt == "bf16" and spec.upgrade else fmt


def quantize_block(
    block: nn.Module,
    stats: BlockStats,
    scales: dict[str, torch.Tensor],
    spec: StreamSpec,
    layer: int,
) -> nn.Module:
    """`block` (bf16, transformed) with its linears in the stream's format."""
    from builder.dtypes import FP8_MAX
    from builder.quantize.formats import (
        LinearFormat,
        RowwiseFp8Linear,
        TensorFp8Linear,
        channel_scales,
        quantized_linear,
    )
    from builder.quantize.fp8 import FP8

    if spec.fmt == "bf16":
        return block
    out = copy.deepcopy(block)
    for name in LINEARS:
        fmt_name = linear_format(spec, layer, name)
        if fmt_name == "bf16":
            continue
        spec_l = StreamSpec(fmt_name, spec.alpha, spec.placebo, spec.gptq)
        if fmt_name in ("int8wo", "int8sq"):  # per-channel INT8 weights (W8A16 / W8A8)
            weight = out.get_submodule(name).weight.detach()
            s8 = weight.float().abs().amax(dim=1).clamp_min(1e-12) / INT8_MAX
            if spec.gptq:
                reader = READS.get(name, name)
                sc = scales[reader]
                q = gptq_int8(weight, stats.hessian[reader] / (sc[:, None] * sc[None, :]), s8)
            else:
                q = torch.round(weight.float() / s8[:, None]).clamp(-INT8_MAX, INT8_MAX)
                q = q * s8[:, None]
            parent, leaf = name.rsplit(".", 1)
            new = DequantizedLinear(q) if fmt_name == "int8wo" else Int8TokenLinear(q)
            setattr(out.get_submodule(parent), leaf, new)
            continue
        if fmt_name == "fp8-block":
            if spec.exact_weights:
                raise SystemExit("error: fp8-block: no exactw stream")
            parent, leaf = name.rsplit(".", 1)
            weight = out.get_submodule(name).weight.detach()
            dequantized = None
            if spec.gptq:
                reader = READS.get(name, name)
                sc = scales[reader]
                hessian = stats.hessian[reader] / (sc[:, None] * sc[None, :])
                dequantized = gptq_elementwise_scales(weight, hessian, block_scales(weight))
            setattr(out.get_submodule(parent), leaf, BlockFp8Linear(weight, dequantized))
            continue
        reader = READS.get(name, name)
        parent, leaf = name.rsplit(".", 1)
        linear = out.get_submodule(name)
        weight = linear.weight.detach()
        x_amax = float((stats.xmax[reader] / scales[reader]).max())  # shared by the readers
        if spec.exact_weights and spec_l.fmt in ("fp8", "fp8-pc-pt"):
            exact = weight.float()
            if spec_l.fmt == "fp8-pc-pt":  # per-token e4m3 input, unit channel scales
                new = RowwiseFp8Linear(exact, torch.ones(exact.shape[0]))
            else:  # the static per-tensor input scale the format calibrates
                new = TensorFp8Linear(exact, torch.tensor(1.0), torch.tensor(x_amax / FP8_MAX))
            setattr(out.get_submodule(parent), leaf, new)
            continue
        if spec_l.fmt != "wonly" and not spec_l.gptq:  # exactly what builder's streams run
            fmt = LinearFormat(spec_l.fmt)
            new = quantized_linear(linear, fmt, float(weight.abs().max()), x_amax)
            setattr(out.get_submodule(parent), leaf, new)
            continue
        if spec_l.fmt == "fp8":
            w_scale = (weight.abs().max().float() / FP8_MAX).reshape(())
        else:
            w_scale = channel_scales(weight)
        if spec_l.gptq and ASYMMETRIC and spec_l.fmt == "fp8-pc-pt":
            from builder.quantize.gptq import damped

            hq = stats.hessian_q[reader]
            # W + W (X^T Xq - Xq^T Xq) Hq^-1: damping only the correction's inverse (damping
            # the whole W X^T Xq Hq^-1 shrinks the weights of the small channels toward 0)
            hinv = torch.linalg.inv(damped(hq, DAMP))
            w32 = weight.float()
            target = w32 + w32 @ (stats.cross[reader] - hq) @ hinv
            q = gptq(target, hq, w_scale)
        elif spec_l.gptq:
            h = stats.hessian[reader]
            s = scales[reader]
            q = gptq(weight, h / (s[:, None] * s[None, :]), w_scale)  # H of x / s
        else:
            s = w_scale.reshape(-1, 1) if w_scale.dim() else w_scale
            q = (weight.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * s
        if spec_l.fmt == "wonly":
            new = DequantizedLinear(q)
        elif spec_l.fmt == "fp8-pc-pt":
            new = RowwiseFp8Linear((q / w_scale[:, None]).to(FP8), w_scale)
        else:
            new = TensorFp8Linear((q / w_scale).to(FP8), w_scale, torch.tensor(x_amax / FP8_MAX))
        setattr(out.get_submodule(parent), leaf, new)
    return out


# ---- the pass ---------------------------------------------------------------------------
@torch.no_grad()
def measure(src: Path, specs: list[StreamSpec], calib: torch.Tensor, heldout: torch.Tensor):
    from builder.quantize.blockwise import load_block
    from builder.quantize.formats import Recipe
    from builder.verify.sensitivity import StreamScore, _finish, _run, _Stream
    from builder.verify.stream import BlockStream

    stream = BlockStream(src, dtype=torch.bfloat16, keep_blocks=False)
    from builder.arch.plan import AttentionKind, FfnKind

    for layer in stream.plan.layers:
        full = layer.attention is AttentionKind.ATTENTION and layer.ffn is FfnKind.MLP
        if not layer.is_empty and not full:
            raise SystemExit(f"error: block {layer.index}: the probe handles GQA + MLP blocks")
    calib_h = torch.cat([stream.embed(w)[0][None] for w in calib])
    ref = torch.cat([stream.embed(w)[0][None] for w in heldout])
    streams = {s: _Stream(StreamScore(s.name, Recipe())) for s in specs}
    hessians = any(s.gptq for s in specs)
    own_calib: dict[StreamSpec, torch.Tensor] = {}  # --sequential: each gptq stream's states
    for layer, block in stream.blocks():
        if block is None:
            continue
        calib_in = calib_h
        calib_h, stats = observe(stream, block, calib_h, hessians)
        for spec, st in streams.items():
            fp32 = load_block(stream.parts, stream.ckpt, layer.index, "cpu", torch.float32)
            scales = fold(fp32, stats, spec)
            own = stats
            if SEQUENTIAL and spec.gptq:
                # the block's linears' inputs when the blocks before it are quantized (the
                # input maxima, hence per-tensor input scales, stay the BF16 stream's)
                mine = own_calib.get(spec, calib_in)
                own = BlockStats(stats.xmax, observe(stream, block, mine, True)[1].hessian)
            quantized = quantize_block(fp32.to(torch.bfloat16), own, scales, spec, layer.index)
            st.hidden = _run(stream, quantized, ref if st.hidden is None else st.hidden, 4)
            if SEQUENTIAL and spec.gptq:
                own_calib[spec] = _run(stream, quantized, own_calib.get(spec, calib_in), 4)
        ref = _run(stream, block, ref, 4)
        say(f"block {layer.index}")
    head = stream.head_weights()
    ref_logits = [stream.head(ref[i : i + 1], head) for i in range(ref.shape[0])]
    for st in streams.values():
        _finish(st, stream, head, ref, ref_logits)
    return {s.name: streams[s].score for s in specs}


def main() -> None:
    global DAMP, ACT_ORDER, SEQUENTIAL, ASYMMETRIC
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--src", type=Path, help="HF nemotron-nas checkpoint (default: SmolLM2)")
    p.add_argument("--calib-size", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--streams", default="fp8-pc-pt:none,fp8-pc-pt:smooth=0.5,fp8-pc-pt:gptq")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--damp", type=float, default=DAMP, help="GPTQ damping (of mean diag H)")
    p.add_argument("--act-order", action="store_true", help="GPTQ in decreasing diag(H)")
    p.add_argument(
        "--sequential",
        action="store_true",
        help="GPTQ's H from each stream's own calibration states (blocks before quantized)",
    )
    p.add_argument(
        "--asymmetric",
        action="store_true",
        help="fp8-pc-pt GPTQ against the per-token FP8 activations (X W^T ~ Xq Q^T)",
    )
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    DAMP, ACT_ORDER, SEQUENTIAL = args.damp, args.act_order, args.sequential
    ASYMMETRIC = args.asymmetric
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    src = args.src
    if src is None:
        from builder.smollm2 import import_smollm2

        src = args.work / "smollm2"
        if not src.exists():
            import_smollm2(src)
    from builder.quantize.calib import build_calibration_set, load_tokenizer
    from builder.verify.prompts import heldout_windows

    specs = [StreamSpec.parse(t) for t in args.streams.split(",")]
    tok = load_tokenizer(src)
    calib = build_calibration_set("builtin", tok, args.calib_size, args.calib_seq_len, 0).windows
    heldout = heldout_windows(tok, args.windows, args.seq_len)
    say(f"{len(specs)} streams, calibration {tuple(calib.shape)}, held-out {tuple(heldout.shape)}")
    started = time.perf_counter()
    scores = measure(src, specs, calib, heldout)
    seconds = time.perf_counter() - started
    rows = [
        {"stream": name, "kl": s.kl, "kl_p99": s.kl_p99, "top1": s.top1}
        for name, s in scores.items()
    ]
    print(
        f"\nheld-out {args.windows} x {args.seq_len}; calibration {args.calib_size} x "
        f"{args.calib_seq_len}; {seconds:.0f} s\n"
    )
    print("| stream | mean KL | p99 KL | top-1 |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['stream']} | {r['kl']:.4f} | {r['kl_p99']:.3f} | {r['top1']:.4f} |")
    if args.json:
        meta = {
            "windows": args.windows,
            "seq_len": args.seq_len,
            "calib_size": args.calib_size,
            "calib_seq_len": args.calib_seq_len,
            "seconds": round(seconds, 1),
            "gptq_damp": DAMP,
            "gptq_act_order": ACT_ORDER,
            "gptq_sequential": SEQUENTIAL,
            "gptq_asymmetric": ASYMMETRIC,
        }
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
