"""Synthetic nemotron-nas checkpoints: a preset's block pattern at a reduced size.

The block kinds, KV-head counts (up to --heads, 16 by default) and ffn_mult values of the preset are
kept; only hidden size, head count, vocabulary and the layer selection shrink. Weights are
seeded per tensor name, so a layer's weights do not depend on which other layers are kept.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from builder.arch import ModelPlan, hf_tensor_shapes, parse_config, preset_config
from builder.arch.tensors import Role, hf_weight
from builder.chat import nemotron_template
from builder.errors import UserError
from builder.io.atomic import atomic_dir
from builder.io.hf_writer import DEFAULT_SHARD_BYTES, write_hf_weights, write_json
from builder.io.manifest import MANIFEST, ArtifactKind, build_manifest, write_manifest
from builder.units import parse_ranges

HEADS = 16
DEFAULT_HIDDEN = 256
DEFAULT_VOCAB = 1000
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]


@dataclass(frozen=True)
class SynthSpec:
    preset: str
    hidden: int | None = None
    layers: str | None = None
    seed: int = 0
    target_bytes: int | None = None
    dtype: str = "bfloat16"
    vocab: int = DEFAULT_VOCAB
    heads: int = HEADS


# ---- config ---------------------------------------------------------------------------------
def parse_layer_spec(spec: str, num_layers: int) -> list[int]:
    """'0-12,120-135,161' -> sorted unique layer indices, each checked against the preset."""
    return parse_ranges(spec, num_layers, "--layers")


def _scale_block(block: dict[str, Any], heads_from: int, heads: int) -> dict[str, Any]:
    block = copy.deepcopy(block)
    att = block["attention"]
    if not att.get("no_op") and not att.get("replace_with_linear"):
        kv = min(heads_from // att["n_heads_in_group"], heads)
        if heads % kv:
            raise UserError(f"--heads {heads}: not a multiple of the preset's {kv} KV heads")
        att["n_heads_in_group"] = heads // kv
    return block


def synth_config(spec: SynthSpec, hidden: int | None = None) -> dict[str, Any]:
    """The preset's config with its pattern kept and its dimensions reduced."""
    config = preset_config(spec.preset)
    blocks = config["block_configs"]
    if spec.layers:
        blocks = [blocks[i] for i in parse_layer_spec(spec.layers, len(blocks))]
    hidden = (
        hidden
        or spec.hidden
        or (config["hidden_size"] if spec.preset == "mixed" else DEFAULT_HIDDEN)
    )
    if hidden % (2 * spec.heads):
        raise UserError(f"--hidden {hidden}: must be a multiple of 2 x {spec.heads} heads")
    heads_from = config["num_attention_heads"]
    config.update(
        hidden_size=hidden,
        num_attention_heads=spec.heads,
        num_hidden_layers=len(blocks),
        vocab_size=spec.vocab,
        block_configs=[_scale_block(b, heads_from, spec.heads) for b in blocks],
        torch_dtype=spec.dtype,
        bos_token_id=0,
        eos_token_id=[1, 4],
        architectures=["DeciLMForCausalLM"],
    )
    config.pop("auto_map", None)  # there is no remote code to point to
    if config.get("rope_scaling"):
        original = min(config["rope_scaling"]["original_max_position_embeddings"], 256)
        config["rope_scaling"] = dict(
            config["rope_scaling"], original_max_position_embeddings=original
        )
    config["max_position_embeddings"] = min(config.get("max_position_embeddings", 4096), 4096)
    parse_config(config, source=f"synth {spec.preset}")  # fail here, not in a later stage
    return config


def hidden_for_target(spec: SynthSpec) -> int:
    """Smallest hidden size (a multiple of 64) whose checkpoint reaches spec.target_bytes."""
    per = torch.tensor([], dtype=getattr(torch, spec.dtype)).element_size()
    hidden = 64
    while True:
        plan = parse_config(synth_config(spec, hidden), source="synth")
        if plan.total_params * per >= spec.target_bytes or hidden > 65536:
            return hidden
        hidden += 64


# ---- weights --------------------------------------------------------------------------------
def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def synth_tensor(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Seeded weights with sane scales: norms near 1, linears ~ N(0, 1/in_features)."""
    gen = _generator(seed, name)
    if len(shape) == 1:
        return (1.0 + 0.1 * torch.randn(shape, generator=gen)).to(dtype)
    if name == hf_weight(Role.EMBEDDING):
        return torch.randn(shape, generator=gen).to(dtype)
    std = shape[1] ** -0.5
    return (std * torch.randn(shape, generator=gen)).to(dtype)


def synth_tensors(
    plan: ModelPlan, seed: int, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    for name, shape in hf_tensor_shapes(plan).items():
        yield name, synth_tensor(name, shape, seed, dtype)


# ---- tokenizer ------------------------------------------------------------------------------
def write_byte_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer with no merges (one token per byte) and Llama-3 specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = {
        ch: i + len(SPECIAL_TOKENS)
        for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))
    }
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)} | byte_vocab
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS[0],
        eos_token=SPECIAL_TOKENS[4],
        pad_token=SPECIAL_TOKENS[1],
        additional_special_tokens=SPECIAL_TOKENS[2:4],
    )
    fast.chat_template = nemotron_template()
    fast.save_pretrained(directory)


def has_random_weights(directory: str | Path) -> bool:
    """Whether `directory` is a `builder synth` checkpoint (its manifest says so)."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict):
        return False
    source = manifest.get("source")
    return manifest.get("random_weights") is True or (
        isinstance(source, dict) and "synth" in source
    )


# ---- entry point ----------------------------------------------------------------------------
def write_synthetic(
    out: str | Path,
    spec: SynthSpec,
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write an HF-layout nemotron-nas checkpoint for `spec`; returns its directory."""
    hidden = hidden_for_target(spec) if spec.target_bytes else None
    config = synth_config(spec, hidden)
    plan = parse_config(config, source=f"synth {spec.preset}")
    dtype = getattr(torch, spec.dtype)
    out = Path(out)
    with atomic_dir(out, overwrite) as stage:
        write_json(stage / "config.json", config)
        write_json(stage / "generation_config.json", {"bos_token_id": 0, "eos_token_id": [1, 4]})
        write_byte_tokenizer(stage)
        write_hf_weights(stage, synth_tensors(plan, spec.seed, dtype), shard_bytes)
        manifest = build_manifest(
            stage,
            ArtifactKind.HF_CHECKPOINT,
            random_weights=True,
            source={
                "synth": {
                    "preset": spec.preset,
                    "seed": spec.seed,
                    "hidden": plan.hidden_size,
                    "layers": spec.layers,
                }
            },
        )
        write_manifest(stage, manifest)
    return out
