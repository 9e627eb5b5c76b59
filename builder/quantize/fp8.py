"""FP8 E4M3 per-tensor math: scales from amax, weight quantization as each exporter does it.

ModelOpt's two exporters round differently, and our writers reproduce each bit for bit:
the unified HF export divides by a 0-dim fp32 scale, which keeps a bf16 weight in bf16
for the division; the TensorRT-LLM export divides by a [1]-shaped scale, which promotes
to fp32. (0-dim tensors do not take part in type promotion; 1-dim ones do.)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from builder.dtypes import FP8_MAX

FP8 = torch.float8_e4m3fn
KV_SCALE_FLOOR = 1.0  # TensorRT-LLM export only: max(amax / 448, 1.0)


def scale_from_amax(amax: float) -> torch.Tensor:
    """amax / 448 in fp32 (ModelOpt's `amax.float() / maxbound`), as a 0-dim tensor."""
    return torch.tensor(amax, dtype=torch.float32) / FP8_MAX


def trtllm_scale(amax: float) -> torch.Tensor:
    """A TensorRT-LLM scaling factor: fp32, shape [1]."""
    return scale_from_amax(amax).reshape(1)


def kv_cache_scale(k_amax: float, v_amax: float) -> torch.Tensor:
    """TensorRT-LLM `kv_cache_scaling_factor`: max over k and v of max(amax / 448, 1.0)."""
    scales = torch.stack([scale_from_amax(k_amax), scale_from_amax(v_amax)])
    return torch.clamp(scales, min=KV_SCALE_FLOOR).max().reshape(1)


def quantize_hf(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """E4M3 weight as `export_hf_checkpoint` writes it (division in the weight's dtype)."""
    return (weight / scale.reshape(())).to(FP8)


def quantize_trtllm(
    weight: torch.Tensor, scale: torch.Tensor, chunk_bytes: int = 16 << 20
) -> torch.Tensor:
    """E4M3 weight as ModelOpt's TensorRT-LLM export writes it (division in fp32).

    Row chunks bound the fp32 temporary (elementwise, so the result is the same bits). A 16-bit
    weight on the CPU goes through `quantize_by_table` instead: the same bits, about twice as
    fast and more (the fp32 division and the e4m3 rounding were most of the export's time).
    """
    scale = scale.reshape(1)
    if weight.dim() < 2:
        return (weight / scale).to(FP8)
    if weight.dtype in TABLE_DTYPES and weight.device.type == "cpu":
        return quantize_by_table(weight, scale)
    return quantize_by_division(weight, scale, chunk_bytes)


TABLE_DTYPES = (torch.bfloat16, torch.float16)


TABLE_CHUNK = 1 << 14  # below torch's intra-op grain size (32,768 elements), see _table


def _table(dtype: torch.dtype, quantize: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    """`quantize`'s e4m3 byte for each of the 65,536 bit patterns of the 16-bit `dtype`.

    Elementwise, so computed in chunks too small for torch's thread pool: waking it costs
    ~20 ms an op on a loaded machine, which made the tables (one per linear) most of a small
    HF export (measured: 110 ms a table with 2 threads, 0.3 ms inline)."""
    values = torch.from_numpy(np.arange(1 << 16, dtype=np.uint16).view(np.int16)).view(dtype)
    chunks = [quantize(values[i : i + TABLE_CHUNK]) for i in range(0, 1 << 16, TABLE_CHUNK)]
    return np.concatenate([c.view(torch.uint8).numpy() for c in chunks])


def e4m3_table(dtype: torch.dtype, scale: torch.Tensor) -> np.ndarray:
    """The e4m3 byte of every 16-bit `dtype` value divided by `scale` (fp32, [1]): the exact
    elementwise operation of `quantize_by_division`, applied once to all 65,536 bit patterns."""
    return _table(dtype, lambda values: (values / scale.reshape(1)).to(FP8))


def quantize_by_table(
    weight: torch.Tensor, scale: torch.Tensor, chunk: int = 1 << 20
) -> torch.Tensor:
    """`quantize_by_division`'s bits by table lookup on the weight's 16-bit patterns.

    Chunks of 1M elements keep np.take's index temporary (8 bytes an element) in cache: 11x
    faster than the division on a 64M-element weight, 2.3x with 16M chunks (2 loaded cores).
    Every index is < 65,536, the table's length, so mode="clip" only skips the bounds check.
    """
    table = e4m3_table(weight.dtype, scale)
    bits = weight.contiguous().view(torch.int16).numpy().reshape(-1).view(np.uint16)
    out = np.empty(bits.shape, dtype=np.uint8)
    for start in range(0, bits.size, chunk):  # bounds np.take's index temporary
        np.take(table, bits[start : start + chunk], out=out[start : start + chunk], mode="clip")
    return torch.from_numpy(out).view(FP8).reshape(weight.shape)


def quantize_by_division(
    weight: torch.Tensor, scale: torch.Tensor, chunk_bytes: int = 16 << 20
) -> torch.Tensor:
    """e4m3(weight / scale) with the division in fp32, in row chunks."""
    scale = scale.reshape(1)
    out = torch.empty(weight.shape, dtype=FP8, device=weight.device)
    step = max(1, chunk_bytes // (4 * weight[0].numel()))
    for start in range(0, weight.shape[0], step):
        out[start : start + step] = (weight[start : start + step] / scale).to(FP8)
    return out


def dequantize(
    weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    return (weight.to(torch.float32) * scale.to(torch.float32)).to(dtype)


def check_amax(amax: float | None, where: str) -> str | None:
    """Why `amax` cannot make a scale (None, not finite, not positive), or None if it can."""
    if amax is None:
        return f"{where}: enabled quantizer has no amax (it never saw data)"
    if not math.isfinite(amax):
        return f"{where}: amax is {amax} (NaN or infinite activations?)"
    if amax <= 0:
        return f"{where}: amax is {amax} (all-zero data?)"
    return None


def hf_e4m3_table(dtype: torch.dtype, scale: torch.Tensor) -> np.ndarray:
    """`e4m3_table` for `quantize_hf` (division by a 0-dim scale, in the weight's dtype)."""
    return _table(dtype, lambda values: quantize_hf(values, scale))


def lookup_e4m3(table: np.ndarray, bits: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out[i] = table[bits[i]] for 1-D uint16 `bits` (numpy releases the GIL: threads run
    lookups in parallel), in chunks of TableQuantizer.CHUNK elements."""
    step = TableQuantizer.CHUNK
    for start in range(0, bits.size, step):
        stop = start + step
        np.take(table, bits[start:stop], out=out[start:stop], mode="clip")
    return out


class TableQuantizer:
    """Raw 16-bit weight bytes -> their e4m3 bytes by `table` (65,536 entries), into a buffer
    reused block after block (the writer has written and hashed a block before it asks for
    the next)."""

    CHUNK = 1 << 20  # elements per np.take: keeps its 8-byte index temporary in cache

    def __init__(self, table: np.ndarray):
        self.table = table
        self._out = np.empty(0, dtype=np.uint8)

    def __call__(self, raw) -> np.ndarray:
        """`raw`: bytes, or a 2-D uint8 array of rows (a strided view of column ranges)."""
        data = raw if isinstance(raw, np.ndarray) else np.frombuffer(raw, dtype=np.uint8)
        bits = data.view(np.uint16)
        if bits.ndim == 1:
            bits = bits.reshape(1, -1)
        if self._out.size < bits.size:
            self._out = np.empty(bits.size, dtype=np.uint8)
        out = self._out[: bits.size].reshape(bits.shape)
        rows = max(1, self.CHUNK // max(1, bits.shape[1]))
        if bits.shape[0] == 1:  # one long row (contiguous bytes): chunk along it
            lookup_e4m3(self.table, bits[0], out[0])
        else:
            for start in range(0, bits.shape[0], rows):
                stop = start + rows
                np.take(self.table, bits[start:stop], out=out[start:stop], mode="clip")
        return out.reshape(-1)
