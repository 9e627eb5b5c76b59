"""The one parser of nemotron-nas `block_configs`: HF config dict -> immutable per-layer plan.

Every stage asks this plan about layer kinds, head counts and widths; nothing else in
builder reads `block_configs`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any

from builder.arch.schema import (
    AnyValue,
    ArrayOf,
    Boolean,
    Integer,
    Number,
    Object,
    String,
    validate,
)
from builder.errors import ConfigError

ACCEPTED_MODEL_TYPES = ("nemotron-nas", "deci")
ARCHITECTURE = "DeciLMForCausalLM"

# Keys whose non-default value changes the math; builder does not implement them.
_UNSUPPORTED_ATTENTION_KEYS = {
    "sparsify": None,
    "num_sink_tokens": None,
    "window_length": None,
    "unshifted_sink": False,
    "use_prefill_window_in_sink_attention": False,
}
_UNSUPPORTED_FFN_KEYS = {"sparsify": None}

# The fields of config.json that builder reads, with their types and ranges. Other top-level
# keys (HF bookkeeping such as auto_map, bos_token_id) are left alone; a `block_configs` entry
# is closed: an unknown key there may be a new block kind whose math builder lacks.
_ATTENTION_SCHEMA = Object(
    {
        "no_op": Boolean(),
        "replace_with_linear": Boolean(),
        "n_heads_in_group": Integer(minimum=1, nullable=True),
        "sparsify": AnyValue(),
        "num_sink_tokens": Integer(minimum=0, nullable=True),
        "unshifted_sink": Boolean(nullable=True),
        "use_prefill_window_in_sink_attention": Boolean(nullable=True),
        "window_length": Integer(minimum=1, nullable=True),
    },
    closed=True,
)
_FFN_SCHEMA = Object(
    {
        "no_op": Boolean(),
        "replace_with_linear": Boolean(),
        "ffn_mult": Number(minimum=0, exclusive=True, nullable=True),
        "sparsify": AnyValue(),
    },
    closed=True,
)
_ROPE_SCALING_SCHEMA = Object(
    {
        "rope_type": String(),
        "type": String(),
        "factor": Number(minimum=0, exclusive=True),
        "low_freq_factor": Number(minimum=0, exclusive=True),
        "high_freq_factor": Number(minimum=0, exclusive=True),
        "original_max_position_embeddings": Integer(minimum=1),
    },
    nullable=True,
)
CONFIG_SCHEMA = Object(
    {
        "model_type": String(),
        "architectures": ArrayOf(String()),
        "hidden_size": Integer(minimum=1),
        "num_attention_heads": Integer(minimum=1),
        "num_hidden_layers": Integer(minimum=1),
        "vocab_size": Integer(minimum=1),
        "head_dim": Integer(minimum=1),
        "rms_norm_eps": Number(minimum=0, exclusive=True),
        "rope_theta": Number(minimum=0, exclusive=True),
        "rope_scaling": _ROPE_SCALING_SCHEMA,
        "max_position_embeddings": Integer(minimum=1),
        "tie_word_embeddings": Boolean(),
        "torch_dtype": String(),
        "dtype": String(),
        "block_configs": ArrayOf(
            Object(
                {"attention": _ATTENTION_SCHEMA, "ffn": _FFN_SCHEMA},
                required=frozenset({"attention", "ffn"}),
                closed=True,
            )
        ),
    },
    required=frozenset(
        {"hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "block_configs"}
    ),
)

DTYPE_BYTES = {
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "fp8": 1,
    "float8_e4m3fn": 1,
}


class AttentionKind(StrEnum):
    ATTENTION = "attention"
    LINEAR = "linear"
    NO_OP = "no_op"


class FfnKind(StrEnum):
    MLP = "mlp"
    LINEAR = "linear"
    NO_OP = "no_op"


def intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """FFN width of a gated MLP: int(2*m*h/3) rounded up to a multiple of 256 (DeciLM's rule)."""
    n = int(2 * ffn_mult * hidden_size / 3)
    return n if n % 256 == 0 else n + 256 - n % 256


def dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}") from None


@dataclass(frozen=True)
class LayerPlan:
    """One decoder block: its attention part and its FFN part."""

    index: int
    attention: AttentionKind
    ffn: FfnKind
    kv_heads: int | None = None  # GQA layers only
    ffn_width: int | None = None  # gated-MLP layers only

    @property
    def is_empty(self) -> bool:
        return self.attention is AttentionKind.NO_OP and self.ffn is FfnKind.NO_OP

    @property
    def short(self) -> str:
        """Compact 'ATT/FFN' label in the notation of the reference tables."""
        att = {AttentionKind.ATTENTION: f"A{self.kv_heads}", AttentionKind.LINEAR: "L"}.get(
            self.attention, "-"
        )
        ffn = {FfnKind.MLP: str(self.ffn_width), FfnKind.LINEAR: "L"}.get(self.ffn, "-")
        return f"{att}/{ffn}"


@dataclass(frozen=True)
class LayerParams:
    """Parameter counts of one block, by part."""

    attention: int
    attention_norm: int
    ffn: int
    ffn_norm: int

    @property
    def total(self) -> int:
        return self.attention + self.attention_norm + self.ffn + self.ffn_norm


@dataclass(frozen=True)
class ModelPlan:
    """Immutable per-layer description of a nemotron-nas model."""

    hidden_size: int
    num_attention_heads: int
    head_dim: int
    vocab_size: int
    layers: tuple[LayerPlan, ...]
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Mapping[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    torch_dtype: str
    source: str = "<config>"
    hf_config: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    # ---- structure ---------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def attention_layers(self) -> tuple[LayerPlan, ...]:
        return tuple(layer for layer in self.layers if layer.attention is AttentionKind.ATTENTION)

    @property
    def empty_layers(self) -> tuple[LayerPlan, ...]:
        return tuple(layer for layer in self.layers if layer.is_empty)

    @property
    def ffn_widths(self) -> tuple[int, ...]:
        return tuple(sorted({lay.ffn_width for lay in self.layers if lay.ffn is FfnKind.MLP}))

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    # ---- parameters and bytes -------------------------------------------------------
    def layer_params(self, layer: LayerPlan) -> LayerParams:
        h, hd = self.hidden_size, self.head_dim
        attention = norm_a = ffn = norm_f = 0
        if layer.attention is AttentionKind.ATTENTION:
            attention = 2 * h * self.q_size + 2 * h * layer.kv_heads * hd
        elif layer.attention is AttentionKind.LINEAR:
            attention = h * h
        if layer.attention is not AttentionKind.NO_OP:
            norm_a = h
        if layer.ffn is FfnKind.MLP:
            ffn = 3 * h * layer.ffn_width
        elif layer.ffn is FfnKind.LINEAR:
            ffn = h * h
        if layer.ffn is not FfnKind.NO_OP:
            norm_f = h
        return LayerParams(attention, norm_a, ffn, norm_f)

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        layers = sum(self.layer_params(layer).total for layer in self.layers)
        return layers + self.embedding_params + self.lm_head_params + self.hidden_size

    @property
    def linear_params(self) -> int:
        """Parameters in the decoder's linear layers (what FP8 quantizes)."""
        return sum(p.attention + p.ffn for p in map(self.layer_params, self.layers))

    def total_bytes(self, dtype: str = "bfloat16") -> int:
        return self.total_params * dtype_bytes(dtype)

    def fp8_bytes(self) -> int:
        """FP8 linears with BF16 embedding, lm_head and norms (per-tensor scales ignored)."""
        return self.linear_params + 2 * (self.total_params - self.linear_params)

    def kv_bytes_per_token(self, dtype: str = "bfloat16", tp: int = 1) -> int:
        """KV-cache bytes per token on one TP rank (tp=1: the whole model).

        At tp > kv_heads the heads are duplicated, so each rank still holds one.
        """
        per_elem = dtype_bytes(dtype)
        return sum(
            2 * math.ceil(layer.kv_heads / tp) * self.head_dim * per_elem
            for layer in self.attention_layers
        )

    # ---- summaries ------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        kinds = [(layer.attention, layer.ffn) for layer in self.layers]
        return {
            "layers": self.num_layers,
            "attention": sum(a is AttentionKind.ATTENTION for a, _ in kinds),
            "linear_attention": sum(a is AttentionKind.LINEAR for a, _ in kinds),
            "no_op_attention": sum(a is AttentionKind.NO_OP for a, _ in kinds),
            "mlp": sum(f is FfnKind.MLP for _, f in kinds),
            "linear_ffn": sum(f is FfnKind.LINEAR for _, f in kinds),
            "no_op_ffn": sum(f is FfnKind.NO_OP for _, f in kinds),
            "empty": len(self.empty_layers),
        }


# ---- parsing -------------------------------------------------------------------------
def _refuse_unsupported(part: Mapping[str, Any], defaults: Mapping[str, Any], where: str) -> None:
    for key, default in defaults.items():
        value = part.get(key, default)
        if value not in (default, None, False):
            raise ConfigError(
                f"{where}.{key} = {value!r}: this feature changes the layer's math and is "
                "not implemented by builder"
            )


def _parse_attention(
    part: Mapping[str, Any], heads: int, where: str
) -> tuple[AttentionKind, int | None]:
    if part.get("no_op"):
        return AttentionKind.NO_OP, None
    if part.get("replace_with_linear"):
        return AttentionKind.LINEAR, None
    _refuse_unsupported(part, _UNSUPPORTED_ATTENTION_KEYS, where)
    group = part.get("n_heads_in_group")
    if group is None:  # types and ranges were checked by CONFIG_SCHEMA; presence is per kind
        raise ConfigError(f"{where}.n_heads_in_group: required for a GQA attention block, got null")
    if heads % group:
        raise ConfigError(
            f"{where}.n_heads_in_group = {group}: num_attention_heads = {heads} "
            "is not divisible by it"
        )
    return AttentionKind.ATTENTION, heads // group


def _parse_ffn(part: Mapping[str, Any], hidden: int, where: str) -> tuple[FfnKind, int | None]:
    if part.get("no_op"):
        return FfnKind.NO_OP, None
    if part.get("replace_with_linear"):
        return FfnKind.LINEAR, None
    _refuse_unsupported(part, _UNSUPPORTED_FFN_KEYS, where)
    mult = part.get("ffn_mult")
    if mult is None:
        raise ConfigError(f"{where}.ffn_mult: required for a gated-MLP block, got null")
    return FfnKind.MLP, intermediate_size(float(mult), hidden)


def _parse_layer(index: int, block: Any, heads: int, hidden: int, source: str) -> LayerPlan:
    where = f"{source}: block_configs[{index}]"
    attention, kv_heads = _parse_attention(block["attention"], heads, f"{where}.attention")
    ffn, width = _parse_ffn(block["ffn"], hidden, f"{where}.ffn")
    return LayerPlan(index, attention, ffn, kv_heads, width)


def _check_identity(config: Mapping[str, Any], source: str) -> None:
    model_type = config.get("model_type")
    if model_type not in ACCEPTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not a nemotron-nas model "
            f"(expected one of {', '.join(ACCEPTED_MODEL_TYPES)})"
        )
    architectures = config.get("architectures") or [ARCHITECTURE]
    if ARCHITECTURE not in architectures:
        raise ConfigError(
            f"{source}: architectures {architectures!r} does not include {ARCHITECTURE!r}"
        )


def parse_config(config: Any, source: str = "<config>") -> ModelPlan:
    """Validate an HF nemotron-nas config dict and return its per-layer plan."""
    validate(config, CONFIG_SCHEMA, source, ConfigError)
    _check_identity(config, source)
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    num_layers = config["num_hidden_layers"]
    blocks = config["block_configs"]
    if len(blocks) != num_layers:
        raise ConfigError(
            f"{source}: block_configs has {len(blocks)} entries but num_hidden_layers is "
            f"{num_layers}"
        )
    head_dim = config.get("head_dim") or hidden // heads
    if head_dim * heads != hidden and not config.get("head_dim"):
        raise ConfigError(f"{source}: hidden_size {hidden} is not divisible by {heads} heads")
    layers = tuple(_parse_layer(i, b, heads, hidden, source) for i, b in enumerate(blocks))
    scaling = config.get("rope_scaling")
    return ModelPlan(
        hidden_size=hidden,
        num_attention_heads=heads,
        head_dim=head_dim,
        vocab_size=config["vocab_size"],
        layers=layers,
        rms_norm_eps=float(_default(config, "rms_norm_eps", 1e-5)),
        rope_theta=float(_default(config, "rope_theta", 10000.0)),
        rope_scaling=MappingProxyType(dict(scaling)) if scaling else None,
        max_position_embeddings=_default(config, "max_position_embeddings", 4096),
        tie_word_embeddings=_default(config, "tie_word_embeddings", False),
        torch_dtype=str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"),
        source=source,
        hf_config=MappingProxyType(dict(config)),
    )


def _default(config: Mapping[str, Any], key: str, default: Any) -> Any:
    """A field's value, or `default` when it is absent or null (validated by CONFIG_SCHEMA)."""
    value = config.get(key)
    return default if value is None else value


def read_config(checkpoint_dir: str | Path) -> dict[str, Any]:
    path = Path(checkpoint_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no config.json (is this an HF checkpoint directory?)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read: {err}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from None


def load_plan(checkpoint_dir: str | Path) -> ModelPlan:
    """Plan of the HF checkpoint in `checkpoint_dir` (reads config.json only)."""
    path = Path(checkpoint_dir) / "config.json"
    return parse_config(read_config(checkpoint_dir), source=str(path))
