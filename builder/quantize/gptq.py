"""GPTQ rounding (Frantar et al. 2022) of weights to their format's grid at fixed scales: E4M3
for the FP8 formats, INT8 for W8A16.

Both export formats store codes times a scale that the format fixes (per-tensor amax / 448,
each row's amax / 448, or for INT8 each row's amax / 127); which grid point each weight takes
is free. Nearest rounding
takes the closest; GPTQ takes them one column at a time and moves the columns not yet
rounded to compensate, minimising the layer-output error ||(W - Q) X^T||^2 on the
calibration activations X, i.e. tr((W - Q) H (W - Q)^T) with H = X^T X. Scales are not
touched, so the checkpoints stay standard: only other codes.

H is block-diagonal in column chunks (`HessianAccumulator`): Ultra's widest down_proj reads
425,984 columns, whose full H (425,984^2 fp32) would be 726 GB; with chunks of 4,096 it is
104 blocks of 64 MiB, and GPTQ compensates within a chunk only. A chunk that covers the
width is the full H exactly.

Rows are independent in GPTQ (each row's error moves only that row), so the linears that
read one input (q/k/v, gate/up) are rounded as one matrix with one H, and per-channel
scales are per row.

Pure functions: the block-streamed driver lives in builder.quantize.blockwise, the stored
result in builder.quantize.rounding.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from builder.dtypes import FP8_MAX
from builder.quantize.fp8 import FP8

DEFAULT_DAMP = 0.01  # of the mean diagonal of H (GPTQ's `percdamp`)
DEFAULT_CHUNK = 4096  # columns per diagonal block of H
LAZY_BLOCK = 128  # GPTQ's lazy batch: columns whose updates are applied together


class Grid(enum.Enum):
    """The codes a scaled weight can take: E4M3 (FP8 formats, saturating at +-448) or INT8
    (W8A16: integers in [-128, 127])."""

    E4M3 = "e4m3"
    INT8 = "int8"

    @property
    def dtype(self) -> torch.dtype:
        return FP8 if self is Grid.E4M3 else torch.int8

    def codes(self, scaled: torch.Tensor) -> torch.Tensor:
        """The nearest codes of `scaled` (W / scale, fp32)."""
        if self is Grid.E4M3:
            return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8)
        return torch.round(scaled).clamp(-128, 127).to(torch.int8)


class Rounding(enum.Enum):
    """How quantized weights pick their E4M3 codes (`builder quantize --rounding`)."""

    NEAREST = "nearest"
    GPTQ = "gptq"


@dataclass(frozen=True)
class GptqOptions:
    damp: float = DEFAULT_DAMP
    act_order: bool = True  # columns in decreasing diag(H): the probe measured it better
    chunk: int = DEFAULT_CHUNK

    def __post_init__(self) -> None:
        if not self.damp > 0:
            raise ValueError(f"GPTQ damping must be positive (got {self.damp})")
        if self.chunk < 1:
            raise ValueError(f"GPTQ chunk must be at least 1 column (got {self.chunk})")

    def to_json(self) -> dict[str, object]:
        return {"damp": self.damp, "act_order": self.act_order, "chunk": self.chunk}


def column_chunks(width: int, chunk: int) -> list[slice]:
    """The column ranges of H's diagonal blocks."""
    return [slice(a, min(a + chunk, width)) for a in range(0, width, chunk)]


class HessianAccumulator:
    """Block-diagonal X^T X (fp32) of the rows of X added so far, in column chunks."""

    def __init__(self, width: int, chunk: int = DEFAULT_CHUNK, device: str | torch.device = "cpu"):
        self.width = width
        self.chunks = column_chunks(width, chunk)
        self.blocks = [
            torch.zeros(c.stop - c.start, c.stop - c.start, device=device) for c in self.chunks
        ]
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        """Add activations `x` [..., width] (any dtype; accumulated in fp32)."""
        x = x.detach().reshape(-1, self.width).float()
        for c, block in zip(self.chunks, self.blocks, strict=True):
            xc = x[:, c]
            block.addmm_(xc.T, xc)
        self.rows += x.shape[0]

    def dense(self) -> torch.Tensor:
        """The block-diagonal H as one [width, width] matrix (for tests and small widths)."""
        return torch.block_diag(*self.blocks)


def nearest_codes(
    weight: torch.Tensor, scale: torch.Tensor, grid: Grid = Grid.E4M3
) -> torch.Tensor:
    """The codes of W / scale with the division in fp32 (`scale`: 0-dim, one per row, or one
    per element)."""
    return grid.codes(weight.float() / _against_weight(scale))


def dequantized(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * _against_weight(scale)


def _against_weight(scale: torch.Tensor) -> torch.Tensor:
    """`scale` (0-dim, [out] or [out, in]) shaped to broadcast against an [out, in] weight."""
    return scale.float().reshape(-1, 1) if scale.dim() == 1 else scale.float()


def damped(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """H with never-seen columns given a unit diagonal and `damp` x mean(diag) added.

    A column no calibration token activated has a zero row and column in H: it is rounded
    to nearest and (its row of H^-1 being zero off the diagonal) moves nothing else."""
    h = hessian.float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], device=h.device)
    return h


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (GPTQ's trick: its rows are the OBS updates)."""
    for attempt in range(4):  # fp32 can lose definiteness on a nearly singular H
        try:
            lower = torch.linalg.cholesky(h)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            h = h + (10.0**attempt) * 1e-3 * torch.diagonal(h).mean() * torch.eye(
                h.shape[0], device=h.device
            )
    raise torch.linalg.LinAlgError("GPTQ: H is not positive definite even after extra damping")


def gptq_chunk(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scale: torch.Tensor,
    damp: float = DEFAULT_DAMP,
    act_order: bool = True,
    grid: Grid = Grid.E4M3,
) -> tuple[torch.Tensor, float]:
    """`grid` codes of `weight` [out, n] against one H block [n, n] at fixed `scale` (0-dim,
    [out], or [out, n]: one per element, as block scales give), and
    GPTQ's own account of the error it leaves: sum over columns of e^2 / U_jj^2 (U the upper
    Cholesky factor of the damped H^-1), which equals tr((W - Q) H_d (W - Q)^T) for the
    damped H_d exactly (in exact arithmetic): the tests hold it to that."""
    w = weight.float().clone()
    n = w.shape[1]
    h = damped(hessian, damp)
    order = (
        torch.argsort(torch.diagonal(h), descending=True, stable=True)
        if act_order
        else torch.arange(n, device=w.device)
    )
    w, h = w[:, order], h[order][:, order]
    u = _inverse_cholesky(h)
    per_element = scale.dim() == 2
    s = scale.float()[:, order] if per_element else scale.float().reshape(-1)
    codes = torch.empty(w.shape, dtype=grid.dtype, device=w.device)
    loss = torch.zeros((), dtype=torch.float64, device=w.device)
    for a in range(0, n, LAZY_BLOCK):
        b = min(a + LAZY_BLOCK, n)
        w1 = w[:, a:b].clone()
        err = torch.zeros_like(w1)
        u1 = u[a:b, a:b]
        for i in range(b - a):
            col, s_col = w1[:, i], (s[:, a + i] if per_element else s)
            q = grid.codes(col / s_col)
            codes[:, a + i] = q
            e = (col - q.float() * s_col) / u1[i, i]
            loss += (e.double() ** 2).sum()
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err[:, i] = e
        w[:, b:] -= err @ u[a:b, b:]
    return codes[:, torch.argsort(order)], float(loss)


def gptq_codes(
    weight: torch.Tensor,
    hessian: HessianAccumulator,
    scale: torch.Tensor,
    options: GptqOptions = GptqOptions(),
    grid: Grid = Grid.E4M3,
) -> torch.Tensor:
    """`grid` codes of `weight` [out, in] at `scale` (0-dim, or [out]), GPTQ within each of
    H's column chunks (their order is irrelevant: a chunk's error moves no other chunk)."""
    return gptq_rows([weight], hessian, scale, options, grid)[0]


def gptq_rows(
    weights: Sequence[torch.Tensor],
    hessian: HessianAccumulator,
    scale: torch.Tensor,
    options: GptqOptions = GptqOptions(),
    grid: Grid = Grid.E4M3,
) -> list[torch.Tensor]:
    """`gptq_codes` of the row-wise stack of `weights` (the linears reading one input, e.g.
    q/k/v; `scale` is 0-dim or one per stacked row), returned per weight. The stack is made
    one column chunk at a time in fp32, never whole: Ultra's gate/up stacked in fp32 would
    be 56 GB."""
    for w in weights:
        if w.shape[1] != hessian.width:
            raise ValueError(f"weight has {w.shape[1]} columns, H {hessian.width}")
    device = weights[0].device
    codes = [torch.empty(w.shape, dtype=grid.dtype, device=device) for w in weights]
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + w.shape[0])
    for c, block in zip(hessian.chunks, hessian.blocks, strict=True):
        part = torch.cat([w[:, c] for w in weights]) if len(weights) > 1 else weights[0][:, c]
        q, _ = gptq_chunk(part, block.to(device), scale, options.damp, options.act_order, grid)
        for k, out in enumerate(codes):
            out[:, c] = q[bounds[k] : bounds[k + 1]]
    return codes


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - A) H (W - A)^T) = ||(W - A) X^T||^2 for H = X^T X, in float64."""
    d = (weight.double() - approx.double()).to(hessian.device)
    return float(((d @ hessian.double()) * d).sum())
