"""A PyTorch reference executor for TensorRT-LLM DeciLM checkpoints (not an engine).

It runs a checkpoint the way a tp x pp deployment would, on one CPU: for every layer each TP
rank computes its partial result from its own rank file, and the partials are combined as
the collective would (row-parallel `dense`/`proj` outputs summed: the all-reduce;
column-parallel linear replacements and `lm_head` concatenated: the all-gather). Pipeline
stages run in order, each from its own rank files with stage-local layer indices. RoPE
(rope_gpt_neox, llama3 scaling) and GQA follow each layer's `layer_configs` entry; lm_head's
padded vocabulary rows are dropped.

Each linear runs in its own format, so quantized and mixed-precision checkpoints run too
(builder.arch.formats): its format is read from its stored tensors when the checkpoint is
opened (`stored_format`) and picks its implementation from `LINEARS`. A float8_e4m3fn weight is
TensorRT-LLM's per-tensor FP8 GEMM, emulated (activation divided by
`activation_scaling_factor`, rounded to e4m3, multiplied in fp32 with the e4m3 weight, scaled
by weights_scaling_factor x activation_scaling_factor); on a GPU with FP8 tensor cores,
`fp8_gemm="tensor-cores"` runs the same GEMM through `torch._scaled_mm` instead, which is how
the emulation is checked against hardware (scripts/gpu_session.py). An e4m3 weight with a
`per_channel_scale` is TensorRT-LLM's per-channel-per-token FP8 (activations scaled per token
at run time), and a 16-bit weight is a linear left unquantized, unless the config declares it
W8A16: TensorRT-LLM's build then rounds it to INT8 itself, which `WeightOnlyInt8Linear`
reproduces (builder.arch.formats). `linear_hook` replaces every
linear's computation (e.g. to try another quantization scheme). With an FP8 KV cache, k and v
are rounded through e4m3 with `kv_cache_scaling_factor`.

Each layer's work is decided once, when the checkpoint is opened: a per-kind builder
(`ATTENTION_SUBLAYERS`, `FFN_SUBLAYERS`) turns the layer's plan into a `Block` of sublayers
with their tensor names resolved from the role table and each linear's implementation bound;
a forward only runs the blocks.

Generation (`generate`, `greedy`) is batched incremental decode: the prompts, left-padded
to one length, are prefilled once into a `KVCache`, then every step feeds one token per
sequence. Positions are per sequence (a row's padding shifts its RoPE positions) and a mask
keeps every query off its row's padding.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from builder.arch.formats import MIXED_PRECISION, QUANT_CFG, LinearFormat, trtllm_formats
from builder.arch.plan import AttentionKind, FfnKind, LayerPlan
from builder.arch.tensors import (
    Role,
    kv_cache_scale_name,
    kv_heads_per_rank,
    per_channel_scale_name,
    scale_names,
    stage_layers,
    trtllm_module,
    trtllm_weight,
)
from builder.dtypes import F8_E4M3, FP8_MAX
from builder.errors import UserError
from builder.io.trtllm_checkpoint import mapping_of, rank_file_name, read_trtllm_config

TOKEN_SCALE_FLOOR = 1e-12  # an all-zero token row gets a harmless scale, not a division by 0


@dataclass(frozen=True)
class LinearCall:
    """One rank's linear: `x @ weight.T` for TensorRT-LLM module `name` (a role's module)."""

    rank: int
    name: str
    x: torch.Tensor
    executor: TrtllmCheckpointExecutor

    def tensor(self, suffix: str) -> torch.Tensor:
        return self.executor.tensor(self.rank, f"{self.name}.{suffix}")


LinearHook = Callable[[LinearCall], torch.Tensor]

PAD_TOKEN = 0  # fills left padding; no query ever attends to it


@dataclass(frozen=True)
class Window:
    """Where a forward's tokens sit: RoPE tables for their positions, the attention mask
    (None: plain causal attention among the tokens themselves) and the cache they extend."""

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None = None
    cache: KVCache | None = None


@dataclass(frozen=True)
class Generation:
    """A greedy batch: new tokens per sequence, `start` (perf_counter before the prefill) and
    `token_times` (perf_counter when each step's tokens were on the host; step 0 is the
    prefill's), per-step logits [batch, vocab] if kept, and the KV cache's size in bytes."""

    tokens: list[list[int]]
    start: float
    token_times: tuple[float, ...]
    logits: list[torch.Tensor]
    kv_cache_bytes: int


def padded_positions(seq: int, start: int, pad: list[int], device: torch.device) -> torch.Tensor:
    """RoPE positions [batch, seq] of slots start..start+seq of left-padded rows (pads: 0)."""
    slots = torch.arange(start, start + seq, device=device)[None]
    return (slots - torch.tensor(pad, device=device)[:, None]).clamp_min(0)


def padded_mask(seq: int, start: int, pad: list[int], device: torch.device) -> torch.Tensor:
    """Attention mask [batch, 1, seq, start+seq] (True: attend) for queries at slots
    start..start+seq: causal, never onto a row's left padding. A pad query sees itself, so
    no softmax row is empty (an empty row is NaN, and NaN values poison masked-out keys)."""
    query = torch.arange(start, start + seq, device=device)[:, None]
    key = torch.arange(start + seq, device=device)[None]
    first = torch.tensor(pad, device=device)[:, None, None]
    allowed = (key <= query) & ((key >= first) | (key == query))
    return allowed[:, None]


class KVCache:
    """Keys and values of a batch of sequences, for the attention layers only.

    One buffer pair per (TP rank, attention layer), [batch, that layer's KV heads on that
    rank, capacity, head_dim]: heterogeneous layers each keep their own head count, and
    no-op or linear-attention layers keep nothing. With an FP8 KV cache the buffers are
    float8_e4m3fn holding k / kv_cache_scaling_factor, dequantized on read: the values the
    full forward's e4m3 round trip produces. Rows are left-padded: row b's first pad[b]
    slots belong to no position and are masked out.
    """

    def __init__(
        self,
        executor: TrtllmCheckpointExecutor,
        batch: int,
        capacity: int,
        pad: list[int] | None = None,
    ):
        self.batch, self.capacity = batch, capacity
        self.pad = list(pad) if pad is not None else [0] * batch
        if len(self.pad) != batch:
            raise ValueError(f"{len(self.pad)} padding counts for a batch of {batch}")
        self.length = 0
        self.dtype, self.device = executor.dtype, executor.device
        storage = torch.float8_e4m3fn if executor.kv_cache_fp8 else executor.dtype
        hd = executor.plan.head_dim
        self.keys: dict[tuple[int, int], torch.Tensor] = {}
        self.values: dict[tuple[int, int], torch.Tensor] = {}
        for pp_rank in range(executor.pp):
            for index in stage_layers(executor.plan, executor.pp, pp_rank):
                layer = executor.plan.layers[index]
                if not layer.has_kv_cache:
                    continue
                shape = (batch, kv_heads_per_rank(layer.kv_heads, executor.tp), capacity, hd)
                for rank in executor.stage_ranks(pp_rank):
                    self.keys[rank, index] = torch.zeros(shape, dtype=storage, device=self.device)
                    self.values[rank, index] = torch.zeros(shape, dtype=storage, device=self.device)

    @property
    def nbytes(self) -> int:
        buffers = [*self.keys.values(), *self.values.values()]
        return sum(b.numel() * b.element_size() for b in buffers)

    def window(self, seq: int, executor: TrtllmCheckpointExecutor) -> Window:
        if self.length + seq > self.capacity:
            raise ValueError(
                f"KV cache full: {self.length} + {seq} tokens > capacity {self.capacity}"
            )
        cos, sin = executor.rope_at(padded_positions(seq, self.length, self.pad, self.device))
        causal_alone = not any(self.pad) and (seq == 1 or self.length == 0)
        mask = None if causal_alone else padded_mask(seq, self.length, self.pad, self.device)
        return Window(cos, sin, mask, self)

    def append(
        self, rank: int, layer: int, k: torch.Tensor, v: torch.Tensor, scale: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores k, v [batch, heads, seq, hd] after the filled slots; returns all keys and
        values so far in the compute dtype."""
        end = self.length + k.shape[2]
        keys, values = self.keys[rank, layer], self.values[rank, layer]
        if scale is None:
            keys[:, :, self.length : end], values[:, :, self.length : end] = k, v
            return keys[:, :, :end], values[:, :, :end]
        keys[:, :, self.length : end] = fp8_quantize(k, scale)
        values[:, :, self.length : end] = fp8_quantize(v, scale)
        return (
            fp8_dequantize(keys[:, :, :end], scale).to(self.dtype),
            fp8_dequantize(values[:, :, :end], scale).to(self.dtype),
        )

    def advance(self, seq: int) -> None:
        self.length += seq


class TrtllmCheckpointExecutor:
    """Executes a TensorRT-LLM DeciLM checkpoint directory with PyTorch on CPU (or `device`).

    `dtype` is the compute dtype (float32 or bfloat16); logits are returned in float32.
    Weights are read from the memory-mapped rank files when used, not held; `keep_weights`
    holds each tensor on `device` after its first use instead (decode re-reads every weight
    every step: a benchmark wants them resident, as an engine has them).
    """

    def __init__(
        self,
        directory: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        linear_hook: LinearHook | None = None,
        fp8_gemm: str = "emulate",
        keep_weights: bool = False,
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
        self.weight_only = weight_only_modules(self.directory, self.config)
        self._kept: dict[tuple[int, str], torch.Tensor] | None = {} if keep_weights else None
        self._stack = ExitStack()
        self._files: dict[int, Any] = {}
        for rank in self.local_ranks():
            path = self.directory / rank_file_name(rank)
            if not path.is_file():
                raise UserError(f"{path}: missing (world size {self.tp * self.pp})")
            self._files[rank] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        self._names = {rank: set(f.keys()) for rank, f in self._files.items()}
        self.inv_freq = rope_inv_freq(
            self.plan.head_dim, self.plan.rope_theta, self.plan.rope_scaling
        )
        self.blocks: dict[int, Block] = {
            index: self.build_block(self.plan.layers[index], local, self.stage_ranks(pp_rank))
            for pp_rank in range(self.pp)
            for local, index in enumerate(stage_layers(self.plan, self.pp, pp_rank))
        }
        self.head = self.build_lm_head(self.stage_ranks(self.pp - 1))

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- weights --------------------------------------------------------------------------------
    def tensor(self, rank: int, name: str) -> torch.Tensor:
        """A tensor of rank `rank`'s file, as stored (no dtype change)."""
        if self._kept is not None and (rank, name) in self._kept:
            return self._kept[rank, name]
        try:
            tensor = self._files[rank].get_tensor(name).to(self.device)
        except SafetensorError as err:
            raise UserError(
                f"{self.directory / rank_file_name(rank)}: tensor {name!r} unavailable ({err})"
            ) from None
        if self._kept is not None:
            self._kept[rank, name] = tensor
        return tensor

    def has(self, rank: int, name: str) -> bool:
        """Whether rank `rank`'s file stores `name` (a per-channel FP8 linear stores a
        per-channel scale: builder.arch.formats)."""
        return name in self._names[rank]

    def stored_code(self, rank: int, name: str) -> str:
        """The safetensors dtype code of a stored tensor ("BF16", "F8_E4M3"), from the header."""
        try:
            return self._files[rank].get_slice(name).get_dtype()
        except SafetensorError as err:
            raise UserError(
                f"{self.directory / rank_file_name(rank)}: tensor {name!r} unavailable ({err})"
            ) from None

    def weight(self, rank: int, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A tensor in `dtype` (default: the compute dtype), held converted when
        `keep_weights`."""
        dtype = dtype or self.dtype
        key = (rank, f"{name}@{dtype}")
        if self._kept is not None and key in self._kept:
            return self._kept[key]
        tensor = self.tensor(rank, name).to(dtype)
        if self._kept is not None:
            self._kept[key] = tensor
        return tensor

    # ---- building blocks -------------------------------------------------------------------------
    def linear(self, rank: int, module: str) -> Linear:
        """Module `module`'s linear on `rank`, its implementation chosen here once: the
        hook's, or its stored format's from `LINEARS`."""
        if self.linear_hook is not None:
            return HookedLinear(self, rank, module, self.linear_hook)
        return LINEARS[self.stored_format(rank, module)](self, rank, module)

    def stored_format(self, rank: int, module: str) -> LinearFormat:
        """The format `module`'s tensors on `rank` are stored in: an e4m3 weight is FP8,
        per-channel when a per_channel_scale sits beside it; any other weight is unquantized."""
        weight = f"{module}.weight"
        if self.stored_code(rank, weight) != F8_E4M3.code:
            return LinearFormat.W8A16 if self.weight_only(module) else LinearFormat.BF16
        if self.has(rank, per_channel_scale_name(weight)):
            return LinearFormat.FP8_PC_PT
        return LinearFormat.FP8

    def norm(self, rank: int, name: str, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm in fp32, cast back, then scaled by the weight (Llama's order)."""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.plan.rms_norm_eps)
        return self.weight(rank, name) * x32.to(x.dtype)

    def stage_ranks(self, pp_rank: int) -> list[int]:
        return [pp_rank * self.tp + t for t in range(self.tp)]

    # ---- where ranks live (builder.runtime.distributed overrides these: one rank a process)
    def local_ranks(self) -> list[int]:
        """The ranks whose files this process opens: all of them, one process plays every rank."""
        return list(range(self.tp * self.pp))

    def all_reduce(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return all_reduce(parts)

    def all_gather(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return all_gather(parts)

    # ---- forward ---------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [batch, seq, vocab] (float32) for token ids [batch, seq] (or [seq]), every
        sequence starting at position 0 (no cache, plain causal attention)."""
        ids = input_ids[None] if input_ids.dim() == 1 else input_ids
        ids = ids.to(self.device)
        cos, sin = self.rope_tables(ids.shape[1])
        logits = self.run_layers(ids, Window(cos, sin))
        return logits if input_ids.dim() == 2 else logits[0]

    __call__ = forward

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Runs the left-padded prompts [batch, seq] (row b starts with `cache.pad[b]` pad
        tokens), fills `cache` with their keys and values and returns the last position's logits
        [batch, vocab] (float32)."""
        ids = input_ids.to(self.device)
        return self.run_layers(ids, cache.window(ids.shape[1], self))[:, -1]

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token per sequence ([batch]) through the cache: appends its keys and values
        and returns its logits [batch, vocab] (float32)."""
        ids = tokens.to(self.device).reshape(-1, 1)
        return self.run_layers(ids, cache.window(1, self))[:, -1]

    def run_layers(self, ids: torch.Tensor, window: Window) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks.values():  # in layer order: stage by stage
            x = block(x, window)
        if window.cache is not None:
            window.cache.advance(ids.shape[1])
        return self.lm_head(x, self.stage_ranks(self.pp - 1))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight(self.stage_ranks(0)[0], trtllm_weight(Role.EMBEDDING)))

    def rope_tables(self, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope_at(torch.arange(seq, device=self.device))

    def rope_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables for token positions ([seq] -> [seq, hd]; [b, seq] -> [b, 1, seq, hd])."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq.to(self.device)
        emb = torch.cat([angles, angles], dim=-1)
        if positions.dim() == 2:
            emb = emb[:, None]
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    # ---- generation ------------------------------------------------------------------------------
    def new_cache(self, batch: int, capacity: int, pad: list[int] | None = None) -> KVCache:
        return KVCache(self, batch, capacity, pad)

    @torch.no_grad()
    def greedy(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        eos_id: int | None = None,
        use_cache: bool = True,
        keep_logits: bool = False,
    ) -> Generation:
        """Greedy continuation of every prompt, batched (prompts left-padded to one length).

        With the cache (default) the prompts are prefilled once and each step feeds one token
        per sequence; `use_cache=False` re-runs the whole padded batch every step (the
        baseline the cache is measured against). A sequence stops after emitting `eos_id`;
        None (or a finished batch) runs all `max_new_tokens` steps.
        """
        if not prompts or any(not p for p in prompts):
            raise UserError("generate: every prompt needs at least one token")
        if max_new_tokens < 1:
            raise UserError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
        longest = max(len(p) for p in prompts)
        pad = [longest - len(p) for p in prompts]
        rows = [[PAD_TOKEN] * n + list(p) for n, p in zip(pad, prompts, strict=True)]
        ids = torch.tensor(rows, dtype=torch.long, device=self.device)
        start = time.perf_counter()
        times: list[float] = []
        logits_kept: list[torch.Tensor] = []
        cache = self.new_cache(len(prompts), longest + max_new_tokens, pad) if use_cache else None
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        token = ids[:, -1]
        for step in range(max_new_tokens):
            if cache is not None:
                logits = self.prefill(ids, cache) if step == 0 else self.decode_step(token, cache)
            else:
                window = Window(
                    *self.rope_at(padded_positions(ids.shape[1], 0, pad, self.device)),
                    mask=padded_mask(ids.shape[1], 0, pad, self.device),
                )
                logits = self.run_layers(ids, window)[:, -1]
            token = logits.argmax(-1)
            chosen = token.tolist()  # waits for the device: the step's tokens are ready
            times.append(time.perf_counter())
            if keep_logits:
                logits_kept.append(logits)
            for b, t in enumerate(chosen):
                if not done[b]:
                    out[b].append(t)
                    done[b] = eos_id is not None and t == eos_id
            if all(done):
                break
            if cache is None:
                ids = torch.cat([ids, token[:, None]], dim=1)
        return Generation(out, start, tuple(times), logits_kept, cache.nbytes if cache else 0)

    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None = None
    ) -> list[list[int]]:
        """Greedy continuations (new tokens only, each ending at its first `eos_id`)."""
        return self.greedy(prompts, max_new_tokens, eos_id).tokens

    # ---- layers ----------------------------------------------------------------------------------
    def layer(
        self,
        x: torch.Tensor,
        layer: LayerPlan,
        local: int,
        ranks: list[int],
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        """One decoder block on its own (positions from 0, causal, no cache)."""
        block = self.blocks[layer.index]
        if (local, tuple(ranks)) != (block.local, block.ranks):
            raise ValueError(
                f"layer {layer.index} is stage-local layer {block.local} on ranks "
                f"{list(block.ranks)}, not {local} on {ranks}"
            )
        return block(x, Window(cos, sin))

    def build_block(self, layer: LayerPlan, local: int, ranks: list[int]) -> Block:
        """The block's sublayers, decided here once from the plan (as vLLM's
        DeciLMDecoderLayer does): each kind's builder returns its sublayer, or None."""
        sublayers = (
            ATTENTION_SUBLAYERS[layer.attention](self, layer, local, tuple(ranks)),
            FFN_SUBLAYERS[layer.ffn](self, layer, local, tuple(ranks)),
        )
        return Block(layer, local, tuple(ranks), tuple(s for s in sublayers if s is not None))

    def build_lm_head(self, ranks: list[int]) -> tuple[NormedLinear, ...]:
        norm, head = trtllm_weight(Role.FINAL_NORM), trtllm_module(Role.LM_HEAD)
        return tuple(NormedLinear(r, norm, self.linear(r, head)) for r in ranks)

    def attention(
        self, part: AttentionRank, layer: LayerPlan, x: torch.Tensor, window: Window
    ) -> torch.Tensor:
        """This rank's partial attention output (its heads through its slice of `dense`)."""
        hd = self.plan.head_dim
        q_heads = self.plan.num_attention_heads // self.tp
        kv_heads = kv_heads_per_rank(layer.kv_heads, self.tp)
        rank = part.rank
        qkv = part.qkv(self.norm(rank, part.norm, x))
        batch, seq, _ = qkv.shape
        q, k, v = qkv.split([q_heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
        q = q.view(batch, seq, q_heads, hd).transpose(1, 2)
        k = k.view(batch, seq, kv_heads, hd).transpose(1, 2)
        v = v.view(batch, seq, kv_heads, hd).transpose(1, 2)
        q, k = rotate(q, window.cos, window.sin), rotate(k, window.cos, window.sin)
        scale = None if part.kv_scale is None else self.tensor(rank, part.kv_scale).float()
        if window.cache is not None:
            k, v = window.cache.append(rank, layer.index, k, v, scale)
        elif scale is not None:
            k, v = fp8_round_trip(k, scale).to(self.dtype), fp8_round_trip(v, scale).to(self.dtype)
        groups = q_heads // kv_heads  # the rank's query heads all map into its own kv heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if window.mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=seq > 1, scale=hd**-0.5)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=window.mask, scale=hd**-0.5)
        out = out.transpose(1, 2).reshape(batch, seq, q_heads * hd)
        return part.dense(out)

    def mlp(self, part: MlpRank, x: torch.Tensor) -> torch.Tensor:
        """This rank's partial MLP output: proj(silu(fc(x)) * gate(x)) on its slice of the width."""
        h = self.norm(part.rank, part.norm, x)
        return part.proj(F.silu(part.fc(h)) * part.gate(h))

    def normed_linear(self, part: NormedLinear, x: torch.Tensor) -> torch.Tensor:
        return part.linear(self.norm(part.rank, part.norm, x))

    def lm_head(self, x: torch.Tensor, ranks: list[int]) -> torch.Tensor:
        """Logits [..., vocab] (float32) of the last stage's `ranks` (those it was built on)."""
        if tuple(ranks) != tuple(part.rank for part in self.head):
            raise ValueError(f"lm_head is on ranks {[p.rank for p in self.head]}, not {ranks}")
        parts = [self.normed_linear(part, x) for part in self.head]
        return self.all_gather(parts)[..., : self.plan.vocab_size].float()


# ---- per-kind sublayers, built once per layer ---------------------------------------------------
Sublayer = Callable[[torch.Tensor, Window], torch.Tensor]  # the residual update of x


@dataclass(frozen=True)
class Block:
    """One decoder block as the plan decided it: its sublayers, each adding to the residual."""

    layer: LayerPlan
    local: int
    ranks: tuple[int, ...]
    sublayers: tuple[Sublayer, ...]

    def __call__(self, x: torch.Tensor, window: Window) -> torch.Tensor:
        for sublayer in self.sublayers:
            x = x + sublayer(x, window)
        return x


@dataclass(frozen=True)
class AttentionRank:
    """One rank's share of a GQA layer: its norm weight, its linears, and its KV-cache scale
    (None: the KV cache is not FP8)."""

    rank: int
    norm: str
    qkv: Linear
    dense: Linear
    kv_scale: str | None


@dataclass(frozen=True)
class MlpRank:
    """One rank's slice of a gated MLP: its norm weight and its three linears."""

    rank: int
    norm: str
    fc: Linear
    gate: Linear
    proj: Linear


@dataclass(frozen=True)
class NormedLinear:
    """One rank's RMSNorm then linear (a linear replacement's, or lm_head's)."""

    rank: int
    norm: str
    linear: Linear


SublayerBuilder = Callable[
    [TrtllmCheckpointExecutor, LayerPlan, int, tuple[int, ...]], Sublayer | None
]


def gqa_attention(
    ex: TrtllmCheckpointExecutor, layer: LayerPlan, local: int, ranks: tuple[int, ...]
) -> Sublayer:
    """Each rank's heads, partial outputs summed (the all-reduce)."""
    norm, qkv, dense = (
        trtllm_weight(Role.ATTN_NORM, local),
        trtllm_module(Role.ATTN_Q, local),
        trtllm_module(Role.ATTN_OUT, local),
    )
    kv_scale = kv_cache_scale_name(local) if ex.kv_cache_fp8 else None
    parts = [
        AttentionRank(r, norm, ex.linear(r, qkv), ex.linear(r, dense), kv_scale) for r in ranks
    ]
    return lambda x, window: ex.all_reduce([ex.attention(p, layer, x, window) for p in parts])


def gated_mlp(
    ex: TrtllmCheckpointExecutor, layer: LayerPlan, local: int, ranks: tuple[int, ...]
) -> Sublayer:
    """Each rank's slice of the width, partial outputs summed (the all-reduce)."""
    norm = trtllm_weight(Role.FFN_NORM, local)
    fc, gate, proj = (
        trtllm_module(Role.FFN_GATE, local),
        trtllm_module(Role.FFN_UP, local),
        trtllm_module(Role.FFN_DOWN, local),
    )
    parts = [
        MlpRank(r, norm, ex.linear(r, fc), ex.linear(r, gate), ex.linear(r, proj)) for r in ranks
    ]
    return lambda x, window: ex.all_reduce([ex.mlp(p, x) for p in parts])


def linear_replacement(norm_role: Role, linear_role: Role) -> SublayerBuilder:
    """A NAS linear replacement: norm, then a column-parallel linear, outputs all-gathered."""

    def build(
        ex: TrtllmCheckpointExecutor, layer: LayerPlan, local: int, ranks: tuple[int, ...]
    ) -> Sublayer:
        norm, linear = trtllm_weight(norm_role, local), trtllm_module(linear_role, local)
        parts = [NormedLinear(r, norm, ex.linear(r, linear)) for r in ranks]
        return lambda x, window: ex.all_gather([ex.normed_linear(p, x) for p in parts])

    return build


def absent(
    ex: TrtllmCheckpointExecutor, layer: LayerPlan, local: int, ranks: tuple[int, ...]
) -> None:
    return None


ATTENTION_SUBLAYERS: dict[AttentionKind, SublayerBuilder] = {
    AttentionKind.ATTENTION: gqa_attention,
    AttentionKind.LINEAR: linear_replacement(Role.ATTN_NORM, Role.ATTN_LINEAR),
    AttentionKind.NO_OP: absent,
}
FFN_SUBLAYERS: dict[FfnKind, SublayerBuilder] = {
    FfnKind.MLP: gated_mlp,
    FfnKind.LINEAR: linear_replacement(Role.FFN_NORM, Role.FFN_LINEAR),
    FfnKind.NO_OP: absent,
}


# ---- linears: one implementation per format, bound to its tensors at load ---------------------
Linear = Callable[[torch.Tensor], torch.Tensor]  # one rank's x @ W.T


@dataclass(frozen=True)
class DenseLinear:
    """A linear left in the checkpoint dtype, run in the compute dtype."""

    ex: TrtllmCheckpointExecutor
    rank: int
    weight: str

    @classmethod
    def build(cls, ex: TrtllmCheckpointExecutor, rank: int, module: str) -> Self:
        return cls(ex, rank, f"{module}.weight")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.ex.weight(self.rank, self.weight))


@dataclass(frozen=True)
class PerTensorFp8Linear:
    """TensorRT-LLM's per-tensor FP8 GEMM, through the executor's `fp8_gemm`."""

    ex: TrtllmCheckpointExecutor
    rank: int
    weight: str
    w_scale: str
    a_scale: str
    gemm: Fp8Gemm

    @classmethod
    def build(cls, ex: TrtllmCheckpointExecutor, rank: int, module: str) -> Self:
        weight = f"{module}.weight"
        return cls(ex, rank, weight, *scale_names(weight), ex.fp8_gemm)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ex, rank = self.ex, self.rank
        weight = ex.weight(rank, self.weight, self.gemm.weight_dtype)
        w_scale = ex.tensor(rank, self.w_scale).float()
        a_scale = ex.tensor(rank, self.a_scale).float()
        return self.gemm.run(x, weight, w_scale, a_scale).to(ex.dtype)


@dataclass(frozen=True)
class PerChannelFp8Linear:
    """TensorRT-LLM's per-channel-per-token FP8 GEMM, emulated (`fp8_rowwise_linear`)."""

    ex: TrtllmCheckpointExecutor
    rank: int
    weight: str
    channel_scale: str

    @classmethod
    def build(cls, ex: TrtllmCheckpointExecutor, rank: int, module: str) -> Self:
        weight = f"{module}.weight"
        return cls(ex, rank, weight, per_channel_scale_name(weight))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ex, rank = self.ex, self.rank
        weight = ex.weight(rank, self.weight, torch.float32)  # e4m3 -> fp32 is exact
        scale = ex.tensor(rank, self.channel_scale)
        return fp8_rowwise_linear(x, weight, scale).to(ex.dtype)


@dataclass(frozen=True)
class WeightOnlyInt8Linear(DenseLinear):
    """TensorRT-LLM's W8A16 linear built from a 16-bit checkpoint weight: the build rounds the
    weight as cutlass_preprocessors.cpp's symmetric_quantize does (per output channel, scale =
    amax / 128 in fp32, codes round(W / scale) clamped to [-128, 127], the scale stored in
    the model dtype) and the weight-only GEMM computes x @ (codes * scale).T."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self.ex.tensor(self.rank, self.weight)
        return F.linear(x.float(), trtllm_weight_only_int8(w)).to(self.ex.dtype)


def trtllm_weight_only_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TensorRT-LLM's build of a W8A16 weight from the stored 16-bit `weight` [out, in]: int8
    codes [out, in] and one scale per output channel [out] in the weight's dtype."""
    scale = weight.float().abs().amax(dim=1, keepdim=True) / 128
    codes = torch.where(scale > 0, torch.round(weight.float() / scale), 0.0).clamp(-128, 127)
    return codes.to(torch.int8), scale.to(weight.dtype).reshape(-1)


def trtllm_weight_only_int8(weight: torch.Tensor) -> torch.Tensor:
    """The weight TensorRT-LLM's W8A16 GEMM multiplies by, fp32 [out, in], from the stored
    16-bit `weight` [out, in]."""
    codes, scale = trtllm_weight_only_codes(weight)
    return codes.float() * scale.float()[:, None]


def weight_only_modules(directory: Path | None, config: Mapping[str, Any]) -> Callable[[str], bool]:
    """Whether a TensorRT-LLM module (stage-local name) is declared W8A16 by the checkpoint's
    config (one format for every decoder linear) or its quant_cfg.json (per module; without a
    `directory`, a mixed-precision config is refused: its formats are in that file)."""
    quant = config.get("quantization") or {}
    if directory is None and quant.get("quant_algo") == MIXED_PRECISION:
        raise UserError(
            f"a {MIXED_PRECISION} config names its layers' formats in {QUANT_CFG}: "
            "load it from its checkpoint directory"
        )
    found = trtllm_formats(directory, config)
    if found is None:
        return lambda module: False
    default, formats = found
    if default is LinearFormat.W8A16:
        head = trtllm_module(Role.LM_HEAD)
        return lambda module: module != head
    declared = {m for m, f in formats.items() if f is LinearFormat.W8A16}
    return lambda module: module in declared


@dataclass(frozen=True)
class HookedLinear:
    """A linear computed by the executor's `linear_hook` instead of its format's GEMM."""

    ex: TrtllmCheckpointExecutor
    rank: int
    module: str
    hook: LinearHook

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.hook(LinearCall(self.rank, self.module, x, self.ex))


LINEARS: dict[LinearFormat, Callable[[TrtllmCheckpointExecutor, int, str], Linear]] = {
    LinearFormat.BF16: DenseLinear.build,
    LinearFormat.FP8: PerTensorFp8Linear.build,
    LinearFormat.FP8_PC_PT: PerChannelFp8Linear.build,
    LinearFormat.W8A16: WeightOnlyInt8Linear.build,
}


# ---- collectives and numerics ---------------------------------------------------------------
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
        raise UserError(
            f"rotary_scaling type {kind!r} is not supported by the executor (llama3 only)"
        )
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


def fp8_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3(x / scale), saturated at +-448."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def fp8_dequantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.float() * scale


def fp8_round_trip(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x quantized to e4m3 with `scale` and dequantized, in float32."""
    return fp8_dequantize(fp8_quantize(x, scale), scale)


def token_scales(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token activation scales (amax of each token's row / 448), fp32 [..., 1]."""
    amax = x.detach().float().abs().amax(dim=-1, keepdim=True)
    return (amax / FP8_MAX).clamp(min=TOKEN_SCALE_FLOOR)


def fp8_rowwise_linear(
    x: torch.Tensor, weight: torch.Tensor, channel_scale: torch.Tensor
) -> torch.Tensor:
    """Per-channel-per-token FP8 GEMM emulated in fp32: e4m3(x / s_tok) @ W_e4m3.T * s_tok *
    s_chan (what TensorRT-LLM's FP8 rowwise GEMM computes, up to accumulation order)."""
    scale = token_scales(x)
    xq = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return F.linear(xq, weight.float()) * scale * channel_scale.float().reshape(-1)


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, a_scale: torch.Tensor
) -> torch.Tensor:
    """Per-tensor FP8 GEMM emulated: e4m3(x / a_scale) @ e4m3(W).T * (w_scale * a_scale),
    float32."""
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
        xq,
        weight.t(),
        scale_a=a_scale.reshape(()).float(),
        scale_b=w_scale.reshape(()).float(),
        out_dtype=torch.float32,
    )
    return out[: rows.shape[0]].reshape(*x.shape[:-1], weight.shape[0])


@dataclass(frozen=True)
class Fp8Gemm:
    """A per-tensor FP8 GEMM and the dtype it takes the e4m3 weight in (the emulation
    multiplies in fp32: e4m3 -> fp32 is exact, and `keep_weights` holds that copy)."""

    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    weight_dtype: torch.dtype


FP8_GEMMS = {
    "emulate": Fp8Gemm(fp8_linear, torch.float32),
    "tensor-cores": Fp8Gemm(fp8_linear_tensor_cores, torch.float8_e4m3fn),
}
