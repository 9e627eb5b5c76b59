"""A PyTorch reference executor for TensorRT-LLM DeciLM checkpoints (not an engine).

It runs a checkpoint the way a tp x pp deployment would, on one CPU: for every layer each TP
rank computes its partial result from its own rank file, and the partials are combined as
the collective would (row-parallel `dense`/`proj` outputs summed: the all-reduce;
column-parallel linear replacements and `lm_head` concatenated: the all-gather). Pipeline
stages run in order, each from its own rank files with stage-local layer indices. RoPE
(rope_gpt_neox, llama3 scaling) and GQA follow each layer's `layer_configs` entry; lm_head's
padded vocabulary rows are dropped.

Linears go through one method, `linear`, so quantized checkpoints run too: a
float8_e4m3fn weight is executed as TensorRT-LLM's per-tensor FP8 GEMM, emulated (activation
divided by `activation_scaling_factor`, rounded to e4m3, multiplied in fp32 with the e4m3
weight, scaled by weights_scaling_factor x activation_scaling_factor). With an FP8 KV cache,
k and v are rounded through e4m3 with `kv_cache_scaling_factor`. On a GPU with FP8 tensor
cores, `fp8_gemm="tensor-cores"` runs the same GEMM through `torch._scaled_mm` instead, which
is how the emulation is checked against hardware (scripts/gpu_session.py). `linear_hook` replaces the
linear computation entirely (e.g. to try another quantization scheme).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from builder.arch.plan import AttentionKind, FfnKind, LayerPlan
from builder.arch.tensors import ACTIVATION_SCALE, KV_CACHE_SCALE, WEIGHTS_SCALE, stage_layers
from builder.convert.rank_writer import rank_file_name
from builder.convert.trtllm_config import mapping_of, read_trtllm_config
from builder.errors import UserError

FP8_MAX = 448.0


@dataclass(frozen=True)
class LinearCall:
    """One rank's linear: `x @ weight.T` for module `name` (e.g. `transformer.layers.3.ffn.fc`)."""

    rank: int
    name: str
    x: torch.Tensor
    executor: TrtllmCheckpointExecutor

    def tensor(self, suffix: str) -> torch.Tensor:
        return self.executor.tensor(self.rank, f"{self.name}.{suffix}")


LinearHook = Callable[[LinearCall], torch.Tensor]


class TrtllmCheckpointExecutor:
    """Executes a TensorRT-LLM DeciLM checkpoint directory with PyTorch on CPU (or `device`).

    `dtype` is the compute dtype (float32 or bfloat16); logits are returned in float32.
    Weights are read from the memory-mapped rank files when used, not held.
    """

    def __init__(
        self,
        directory: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        linear_hook: LinearHook | None = None,
        fp8_gemm: str = "emulate",
    ):
        self.directory = Path(directory)
        self.config, self.plan = read_trtllm_config(self.directory)
        self.tp, self.pp = mapping_of(self.config)
        self.dtype, self.device = dtype, torch.device(device)
        self.linear_hook = linear_hook
        if fp8_gemm not in FP8_GEMMS:
            raise UserError(f"fp8_gemm {fp8_gemm!r}: expected one of {', '.join(FP8_GEMMS)}")
        self.fp8_gemm = FP8_GEMMS[fp8_gemm]
        quant = self.config.get("quantization") or {}
        self.kv_cache_fp8 = quant.get("kv_cache_quant_algo") == "FP8"
        self._stack = ExitStack()
        self._files = []
        for rank in range(self.tp * self.pp):
            path = self.directory / rank_file_name(rank)
            if not path.is_file():
                raise UserError(f"{path}: missing (world size {self.tp * self.pp})")
            self._files.append(self._stack.enter_context(safe_open(str(path), framework="pt")))
        self.inv_freq = rope_inv_freq(self.plan.head_dim, self.plan.rope_theta, self.plan.rope_scaling)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- weights --------------------------------------------------------------------------------
    def tensor(self, rank: int, name: str) -> torch.Tensor:
        """A tensor of rank `rank`'s file, as stored (no dtype change)."""
        try:
            return self._files[rank].get_tensor(name).to(self.device)
        except SafetensorError as err:
            raise UserError(f"{self.directory / rank_file_name(rank)}: tensor {name!r} unavailable ({err})") from None

    def weight(self, rank: int, name: str) -> torch.Tensor:
        return self.tensor(rank, name).to(self.dtype)

    # ---- building blocks --------------------------------------------------------------------------
    def linear(self, rank: int, name: str, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T for module `name` on `rank` (FP8 weights emulated, see module docstring)."""
        if self.linear_hook is not None:
            return self.linear_hook(LinearCall(rank, name, x, self))
        weight = self.tensor(rank, f"{name}.weight")
        if weight.dtype == torch.float8_e4m3fn:
            w_scale = self.tensor(rank, f"{name}.{WEIGHTS_SCALE}").float()
            a_scale = self.tensor(rank, f"{name}.{ACTIVATION_SCALE}").float()
            return self.fp8_gemm(x, weight, w_scale, a_scale).to(self.dtype)
        return F.linear(x, weight.to(self.dtype))

    def norm(self, rank: int, name: str, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm in fp32, cast back, then scaled by the weight (Llama's order)."""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.plan.rms_norm_eps)
        return self.weight(rank, name) * x32.to(x.dtype)

    def stage_ranks(self, pp_rank: int) -> list[int]:
        return [pp_rank * self.tp + t for t in range(self.tp)]

    # ---- forward ----------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [batch, seq, vocab] (float32) for token ids [batch, seq] (or [seq])."""
        ids = input_ids[None] if input_ids.dim() == 1 else input_ids
        ids = ids.to(self.device)
        first = self.stage_ranks(0)[0]
        x = F.embedding(ids, self.weight(first, "transformer.vocab_embedding.weight"))
        cos, sin = self.rope_tables(ids.shape[1])
        for pp_rank in range(self.pp):
            ranks = self.stage_ranks(pp_rank)
            for local, index in enumerate(stage_layers(self.plan, self.pp, pp_rank)):
                x = self.layer(x, self.plan.layers[index], local, ranks, cos, sin)
        logits = self.lm_head(x, self.stage_ranks(self.pp - 1))
        return logits if input_ids.dim() == 2 else logits[0]

    __call__ = forward

    def rope_tables(self, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        angles = torch.arange(seq, dtype=torch.float32, device=self.device)[:, None] * self.inv_freq.to(self.device)
        emb = torch.cat([angles, angles], dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def layer(
        self, x: torch.Tensor, layer: LayerPlan, local: int, ranks: list[int], cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        prefix = f"transformer.layers.{local}"
        if layer.attention is AttentionKind.ATTENTION:
            x = x + all_reduce([self.attention(r, prefix, layer, x, cos, sin) for r in ranks])
        elif layer.attention is AttentionKind.LINEAR:
            x = x + all_gather([self.linear(r, f"{prefix}.attention", self.norm(r, f"{prefix}.input_layernorm.weight", x)) for r in ranks])
        if layer.ffn is FfnKind.MLP:
            x = x + all_reduce([self.mlp(r, prefix, x) for r in ranks])
        elif layer.ffn is FfnKind.LINEAR:
            x = x + all_gather([self.linear(r, f"{prefix}.ffn", self.norm(r, f"{prefix}.post_layernorm.weight", x)) for r in ranks])
        return x

    def attention(
        self, rank: int, prefix: str, layer: LayerPlan, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """This rank's partial attention output (its heads through its slice of `dense`)."""
        hd = self.plan.head_dim
        q_heads = self.plan.num_attention_heads // self.tp
        kv_heads = math.ceil(layer.kv_heads / self.tp)
        h = self.norm(rank, f"{prefix}.input_layernorm.weight", x)
        qkv = self.linear(rank, f"{prefix}.attention.qkv", h)
        batch, seq, _ = qkv.shape
        q, k, v = qkv.split([q_heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
        q = q.view(batch, seq, q_heads, hd).transpose(1, 2)
        k = k.view(batch, seq, kv_heads, hd).transpose(1, 2)
        v = v.view(batch, seq, kv_heads, hd).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if self.kv_cache_fp8:
            scale = self.tensor(rank, f"{prefix}.attention.{KV_CACHE_SCALE}").float()
            k, v = fp8_round_trip(k, scale).to(self.dtype), fp8_round_trip(v, scale).to(self.dtype)
        groups = q_heads // kv_heads  # the rank's query heads all map into its own kv heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=hd**-0.5)
        out = out.transpose(1, 2).reshape(batch, seq, q_heads * hd)
        return self.linear(rank, f"{prefix}.attention.dense", out)

    def mlp(self, rank: int, prefix: str, x: torch.Tensor) -> torch.Tensor:
        """This rank's partial MLP output: proj(silu(fc(x)) * gate(x)) on its slice of the width."""
        h = self.norm(rank, f"{prefix}.post_layernorm.weight", x)
        inner = F.silu(self.linear(rank, f"{prefix}.ffn.fc", h)) * self.linear(rank, f"{prefix}.ffn.gate", h)
        return self.linear(rank, f"{prefix}.ffn.proj", inner)

    def lm_head(self, x: torch.Tensor, ranks: list[int]) -> torch.Tensor:
        parts = [self.linear(r, "lm_head", self.norm(r, "transformer.ln_f.weight", x)) for r in ranks]
        return all_gather(parts)[..., : self.plan.vocab_size].float()


# ---- collectives and numerics -----------------------------------------------------------------------
def all_reduce(parts: list[torch.Tensor]) -> torch.Tensor:
    """Sum of the ranks' partial results, in rank order (what the TP all-reduce computes)."""
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def all_gather(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenation of the ranks' column-parallel outputs along the feature dimension."""
    return torch.cat(parts, dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rope_gpt_neox (rotate-half) on [batch, heads, seq, head_dim]."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def rope_inv_freq(head_dim: int, theta: float, scaling: Any) -> torch.Tensor:
    """RoPE inverse frequencies, with llama3 frequency-dependent scaling when configured."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if kind in (None, "default"):
        return inv
    if kind != "llama3":
        raise UserError(f"rotary_scaling type {kind!r} is not supported by the executor (llama3 only)")
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    # long wavelengths are slowed by `factor`, short ones kept, the band between interpolated
    scaled = torch.where(wavelen > original / low, inv / factor, inv)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, blended, scaled)


def fp8_round_trip(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x quantized to e4m3 with `scale` and dequantized, in float32."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, a_scale: torch.Tensor) -> torch.Tensor:
    """Per-tensor FP8 GEMM emulated: e4m3(x / a_scale) @ e4m3(W).T * (w_scale * a_scale), float32."""
    xq = (x.float() / a_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return F.linear(xq, weight.float()) * (w_scale * a_scale)


def fp8_linear_tensor_cores(
    x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, a_scale: torch.Tensor
) -> torch.Tensor:
    """The same per-tensor FP8 GEMM on FP8 tensor cores (`torch._scaled_mm`, fp32 output).

    cuBLASLt wants a column-major second operand (W.T of a row-major W is) and rows in
    multiples of 16, so the activation rows are zero-padded and the padding dropped.
    """
    rows = x.reshape(-1, x.shape[-1])
    xq = (rows.float() / a_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    pad = -xq.shape[0] % 16
    if pad:
        xq = torch.cat([xq, xq.new_zeros(pad, xq.shape[1])])
    out = torch._scaled_mm(
        xq, weight.t(), scale_a=a_scale.reshape(()).float(), scale_b=w_scale.reshape(()).float(),
        out_dtype=torch.float32,
    )
    return out[: rows.shape[0]].reshape(*x.shape[:-1], weight.shape[0])


FP8_GEMMS = {"emulate": fp8_linear, "tensor-cores": fp8_linear_tensor_cores}
