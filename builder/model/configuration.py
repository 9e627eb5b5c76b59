"""The transformers config of a nemotron-nas (DeciLM) checkpoint, backed by builder's one parser.

`block_configs` is interpreted only by `builder.arch.parse_config`; this class validates the
config through it when constructed and exposes the resulting `ModelPlan` as `config.plan`. It
also keeps `block_configs` as typed, attribute-accessible dataclasses because ModelOpt's
TensorRT-LLM export calls `dataclasses.asdict(config.block_configs[i])` on each layer; those
dataclasses only mirror the JSON keys and decide nothing.

Serialized back (`to_dict`, `save_pretrained`, ModelOpt's HF export) it writes the published
layout: `rope_theta` / `rope_scaling` instead of transformers' internal `rope_parameters`, plain
`block_configs` dicts, and no `auto_map` (there is no remote code to point to, and builder never
runs any). The dtype is written as transformers 5 spells it (`dtype`); parse_config reads both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig

from builder.arch import ModelPlan, parse_config
from builder.arch.plan import ARCHITECTURE
from builder.errors import ConfigError


@dataclass(frozen=True)
class AttentionBlockConfig:
    """The `attention` entry of one `block_configs` item, key for key."""

    no_op: bool = False
    replace_with_linear: bool = False
    n_heads_in_group: int | None = None
    sparsify: Any = None
    num_sink_tokens: int | None = None
    unshifted_sink: bool = False
    use_prefill_window_in_sink_attention: bool = False
    window_length: int | None = None


@dataclass(frozen=True)
class FfnBlockConfig:
    """The `ffn` entry of one `block_configs` item, key for key."""

    no_op: bool = False
    replace_with_linear: bool = False
    ffn_mult: float | None = None
    sparsify: Any = None


@dataclass(frozen=True)
class BlockConfig:
    attention: AttentionBlockConfig
    ffn: FfnBlockConfig

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _known_keys(cls: type, part: Mapping[str, Any]) -> dict[str, Any]:
    # Unknown keys were already judged by parse_config (which ignores them); keep the rest verbatim.
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in part.items() if k in names}


def as_block_config(block: Mapping[str, Any] | BlockConfig) -> BlockConfig:
    """The dataclass view of one (already validated) `block_configs` entry."""
    if isinstance(block, BlockConfig):
        return block
    return BlockConfig(
        attention=AttentionBlockConfig(**_known_keys(AttentionBlockConfig, block["attention"])),
        ffn=FfnBlockConfig(**_known_keys(FfnBlockConfig, block["ffn"])),
    )


def block_dict(block: Any) -> Any:
    """A `block_configs` entry as plain JSON data (dataclass or dict in, dict out)."""
    if isinstance(block, BlockConfig):
        return block.to_dict()
    if is_dataclass(block) and not isinstance(block, type):
        return asdict(block)
    return block


# Features of the published config that this model does not implement; refused with the field.
_UNSUPPORTED_FLAGS = ("attention_bias", "mlp_bias")
# Static RoPE variants only: dynamic ones would need per-call frequency updates.
SUPPORTED_ROPE_TYPES = ("default", "llama3")


@strict
class DeciLMConfig(PretrainedConfig):
    r"""Configuration of a nemotron-nas (DeciLM) decoder with per-layer `block_configs`.

    Field names and meanings are those of the published `config.json` of
    Llama-3.1-Nemotron-Ultra-253B-v1 / Llama-3.3-Nemotron-Super-49B-v1. `num_key_value_heads`
    and `intermediate_size` stay `null`: the real values are per layer, in `config.plan`.
    """

    model_type = "nemotron-nas"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values", "cache"]

    vocab_size: int = 128256
    hidden_size: int = 8192
    num_hidden_layers: int = 80
    num_attention_heads: int = 64
    head_dim: int | None = None
    num_key_value_heads: int | None = None
    intermediate_size: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: float | None = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pretraining_tp: int | None = 1
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: int | float | None = 0.0
    mlp_bias: bool = False
    block_configs: list | None = None

    def __post_init__(self, **kwargs):
        # The published configs name remote code; builder loads none, so the pointer is dropped
        # rather than written back next to weights that ship no code.
        kwargs.pop("auto_map", None)
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)
        if not self.architectures:
            self.architectures = [ARCHITECTURE]
        if self.block_configs is not None:
            self._validate_published_fields()
            self.block_configs = [as_block_config(b) for b in self.block_configs]

    # ---- the plan --------------------------------------------------------------------
    @property
    def source(self) -> str:
        name = getattr(self, "_name_or_path", "") or ""
        return f"{name}/config.json" if name else f"{self.model_type} config"

    @property
    def plan(self) -> ModelPlan:
        """The per-layer plan from builder's parser (raises ConfigError naming the field)."""
        if self.block_configs is None:
            raise ConfigError(f"{self.source}: required field 'block_configs' is missing")
        return parse_config(self._plan_input(), source=self.source)

    def _validate_published_fields(self) -> None:
        for flag in _UNSUPPORTED_FLAGS:
            if getattr(self, flag):
                raise ConfigError(
                    f"{self.source}: {flag} = true: bias tensors are not part of nemotron-nas and "
                    "are not implemented by builder"
                )
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"{self.source}: rope_scaling.rope_type = {rope_type!r} is not implemented "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        self.plan  # noqa: B018  (parse now, so a bad config fails at load and names the field)

    def _plan_input(self) -> dict[str, Any]:
        """The subset of the published config that parse_config reads."""
        rope_theta, rope_scaling = self._published_rope()
        return {
            "model_type": self.model_type,
            "architectures": self.architectures,
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "block_configs": [block_dict(b) for b in self.block_configs],
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": str(self.dtype).removeprefix("torch.") if self.dtype else None,
        }

    # ---- published layout on the way out -------------------------------------------------
    def _published_rope(self) -> tuple[float, dict[str, Any] | None]:
        rope = dict(self.rope_parameters or {})
        theta = float(rope.pop("rope_theta", self.default_theta))
        scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
        return theta, scaling

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if out.get("block_configs") is not None:
            out["block_configs"] = [block_dict(b) for b in out["block_configs"]]
        out.pop("rope_parameters", None)
        out["rope_theta"], out["rope_scaling"] = self._published_rope()
        return out


class DeciConfig(DeciLMConfig):
    """The same config under `model_type` "deci" (TensorRT-LLM's spelling)."""

    model_type = "deci"


# transformers keys configs by model_type but pairs model and config classes by class *name*
# (AutoModel.register), so the "deci" spelling keeps the name DeciLMConfig; its qualname stays
# DeciConfig, which is what pickle uses to find it.
DeciConfig.__name__ = DeciLMConfig.__name__
