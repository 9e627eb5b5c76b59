"""The reference model run one block at a time over many sequences (memory: one block).

The golden and the `hf` runtime both run here, as `builder quantize` calibrates: the
embedding rows the tokens use are read, then each block is built from a meta-device skeleton
of builder's reference model, filled from the checkpoint, run over every sequence and freed;
the final norm and lm_head come last. So Ultra needs one GPU (one block of at most 13 GB plus
the lm_head) and a small model runs on a CPU. Each sequence runs alone (no padding, no mask):
the weights are read once per pass whatever the number of sequences.

Continuations (`continue_sequences`: greedy or sampled, builder.verify.sampling) keep one KV
cache per sequence across passes; every new token costs one pass over the weights (for Ultra
from disk: minutes per token, so keep continuations short).

Weights: `BlockLoader` decides how a block is filled: `bf16_block` (the source checkpoint as
it is) or builder.verify.hf_fp8's dequantizing loader for a unified HF FP8 export.
"""

from __future__ import annotations

import copy
import gc
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, closing, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from builder.arch import ModelPlan, load_plan
from builder.arch.plan import LayerPlan
from builder.arch.tensors import Role, hf_weight
from builder.io.checkpoint import HFCheckpoint
from builder.io.prefetch import StreamStats, prefetch_by_default, prefetched
from builder.quantize.blockwise import embed_windows, load_block
from builder.verify.sampling import Sampler

KEEP_BYTES = 2 << 30
BlockLoader = Callable[["BlockStream", int], torch.nn.Module]
# observe(layer, sequence index, block input, block output)
Observer = Callable[[LayerPlan, int, torch.Tensor, torch.Tensor], None]


def bf16_block(stream: BlockStream, index: int) -> torch.nn.Module:
    """Block `index` with the checkpoint's weights as stored, cast to the compute dtype."""
    return load_block(stream.parts, stream.ckpt, index, stream.device, stream.dtype)


class Skeleton:
    """The reference model on the meta device (no memory); blocks are deep-copied out of it.

    The same duck type as builder.quantize.blockwise.ModelParts (`layer`, `rotary`), without
    its ModelOpt attention registration, which verification does not need.
    """

    def __init__(self, src: Path):
        from builder.model import DeciLMConfig, DeciLMForCausalLM

        self.config = DeciLMConfig.from_pretrained(str(src))
        self.config._attn_implementation = "sdpa"
        with torch.device("meta"):
            self.model = DeciLMForCausalLM(self.config)

    def layer(self, index: int, dtype: torch.dtype) -> torch.nn.Module:
        return copy.deepcopy(self.model.model.layers[index]).to(dtype)

    def rotary(self, device: str) -> torch.nn.Module:
        with torch.device(device):
            return type(self.model.model.rotary_emb)(config=self.config)


@dataclass
class Sequence:
    """One sequence's state across passes: its ids, hidden states and KV cache."""

    ids: torch.Tensor  # [L] all ids so far
    cache: Any = None
    seen: int = 0  # positions already in the cache
    hidden: torch.Tensor | None = None


@dataclass
class BlockStream:
    src: Path
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    loader: BlockLoader = bf16_block
    # entered around each block's forward (the FP8 KV-cache rounding of the hf runtime)
    forward_context: Callable[[], AbstractContextManager] = nullcontext
    ckpt: HFCheckpoint = field(init=False)
    plan: ModelPlan = field(init=False)
    # keep loaded blocks for later passes (greedy steps): None = when the weights in the
    # compute dtype fit in KEEP_BYTES
    keep_blocks: bool | None = None
    prefetch: bool | None = None  # load block i+1 while block i runs; None: on CUDA only
    parts: Skeleton = field(init=False)
    weights: StreamStats = field(init=False)  # every pass's block loads
    pass_seconds: float = field(init=False, default=0.0)  # wall time of the passes

    def __post_init__(self) -> None:
        self.src = Path(self.src)
        self.ckpt = HFCheckpoint(self.src)
        self.plan = load_plan(self.src)
        self.parts = Skeleton(self.src)
        self._rotary = self.parts.rotary(self.device)
        if self.keep_blocks is None:
            bytes_per = torch.finfo(self.dtype).bits // 8
            self.keep_blocks = self.plan.total_params * bytes_per <= KEEP_BYTES
        self._kept: dict[int, torch.nn.Module] = {}
        if self.prefetch is None:
            self.prefetch = prefetch_by_default(self.device)
        self.weights = StreamStats(prefetch=self.prefetch)

    def streaming(self) -> dict[str, Any]:
        """Weights streamed over all passes so far: bytes, GB/s, load and wait seconds."""
        return self.weights.summary(self.pass_seconds)

    # ---- pieces ----------------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """[1, L, hidden] embeddings of ids [L]."""
        return embed_windows(self.ckpt, ids[None], self.dtype, self.device)

    def blocks(self) -> Iterator[tuple[LayerPlan, torch.nn.Module | None]]:
        """(layer, block) in order, empty blocks yielding None; one block alive at a time, two
        with `prefetch` (the next one loading while the caller runs this one)."""
        todo = [lay for lay in self.plan.layers if not lay.is_empty and lay.index not in self._kept]
        loads = prefetched(
            todo,
            lambda lay: self.loader(self, lay.index),
            enabled=self.prefetch,
            device=self.device,
            stats=self.weights,
        )
        with closing(loads):
            for layer in self.plan.layers:
                if layer.is_empty:
                    yield layer, None
                    continue
                block = self._kept.get(layer.index)
                if block is None:
                    _, loaded = next(loads)
                    block = loaded.take()
                if self.keep_blocks:
                    self._kept[layer.index] = block
                yield layer, block
                if not self.keep_blocks:
                    del block
                    gc.collect(1)
                    if self.device.startswith("cuda"):
                        torch.cuda.empty_cache()

    def position_embeddings(self, hidden: torch.Tensor, start: int) -> Any:
        positions = torch.arange(start, start + hidden.shape[1], device=self.device)[None]
        with torch.no_grad():
            return self._rotary(hidden, positions)

    @torch.no_grad()
    def run_block(
        self, block: torch.nn.Module, hidden: torch.Tensor, start: int = 0, cache: Any = None
    ) -> torch.Tensor:
        """One block on [1, L, hidden] states whose first position is `start`."""
        with self.forward_context():
            out = block(
                hidden,
                attention_mask=None,
                position_embeddings=self.position_embeddings(hidden, start),
                cache=cache,
            )
        return out[0] if isinstance(out, tuple) else out

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        norm = self.ckpt.read(hf_weight(Role.FINAL_NORM)).to(self.device, self.dtype)
        head = hf_weight(Role.LM_HEAD)
        name = head if head in self.ckpt else hf_weight(Role.EMBEDDING)  # tied
        return norm, self.ckpt.read(name).to(self.device, self.dtype)

    def head(
        self, hidden: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """float32 logits [L, V] of final hidden states [1, L, hidden]."""
        norm, lm_head = weights
        x32 = hidden.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.plan.rms_norm_eps)
        normed = norm * x32.to(hidden.dtype)
        return torch.nn.functional.linear(normed, lm_head)[0].float()

    # ---- passes ----------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(
        self,
        sequences: list[Sequence],
        new_ids: list[torch.Tensor],
        observe: Observer | None = None,
        use_cache: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[torch.Tensor]:
        """One pass over the weights: `new_ids[j]` appended to sequence j; returns each
        sequence's final hidden states of the new positions ([1, n, hidden])."""
        from transformers.cache_utils import DynamicCache

        started = time.perf_counter()
        hidden = [self.embed(ids.to(self.device)) for ids in new_ids]
        for seq in sequences:
            if use_cache and seq.cache is None:
                seq.cache = DynamicCache()
        # No enumerate(): its result tuple would hold the previous block while the next loads.
        done = 0
        for layer, block in self.blocks():
            done += 1
            if block is not None:
                for j, seq in enumerate(sequences):
                    out = self.run_block(
                        block, hidden[j], seq.seen, seq.cache if use_cache else None
                    )
                    if observe is not None:
                        observe(layer, j, hidden[j], out)
                    hidden[j] = out
            elif observe is not None:
                for j in range(len(sequences)):
                    observe(layer, j, hidden[j], hidden[j])
            if progress is not None:
                progress(done, self.plan.num_layers)
            del block  # before the generator frees its own reference and loads the next one
        for seq, ids in zip(sequences, new_ids, strict=True):
            seq.seen += len(ids) if use_cache else 0
            seq.ids = torch.cat([seq.ids, ids.cpu()]) if seq.ids.numel() else ids.cpu()
        self.pass_seconds += time.perf_counter() - started
        return hidden


def continue_sequences(
    stream: BlockStream,
    sequences: list[Sequence],
    first_logits: list[torch.Tensor],
    samplers: list[Sampler],
    head: Any,
    eos_id: int | None = None,
    say: Callable[[str], None] = lambda message: None,
) -> list[list[int]]:
    """New tokens of prefilled sequences (KV caches filled, `first_logits[j]` the logits [V]
    after sequence j's last id): sequence j picks with `samplers[j]` up to its max_tokens and
    stops after emitting `eos_id` (None: exactly max_tokens). One pass over the weights per
    token for the sequences still going."""
    tokens: list[list[int]] = [[] for _ in sequences]
    limits = [s.sampling.max_tokens for s in samplers]
    for j, logits in enumerate(first_logits):
        if limits[j]:
            tokens[j].append(samplers[j](logits))

    def going(j: int) -> bool:
        return 0 < len(tokens[j]) < limits[j] and (eos_id is None or tokens[j][-1] != eos_id)

    longest = max(limits, default=0)
    for step in range(1, longest):
        active = [j for j in range(len(sequences)) if going(j)]
        if not active:
            break
        say(
            f"continuation: token {step + 1}/{longest}, {len(active)} sequences "
            "(one pass over the weights)"
        )
        states = stream.forward(
            [sequences[j] for j in active],
            [torch.tensor([tokens[j][-1]]) for j in active],
            use_cache=True,
        )
        for j, h in zip(active, states, strict=True):
            tokens[j].append(samplers[j](stream.head(h, head)[-1]))
    return tokens
