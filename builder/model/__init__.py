"""Native transformers reference model of nemotron-nas (DeciLM) checkpoints.

Importing this package registers the config and model for `model_type` "nemotron-nas" and
"deci" with transformers' Auto classes, so `AutoModelForCausalLM.from_pretrained(dir)` loads a
published-layout checkpoint with this code. The checkpoint's `auto_map` (remote code) is never
used: a registered local class takes precedence and builder never passes trust_remote_code.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from builder.model.configuration import (
    AttentionBlockConfig,
    BlockConfig,
    DeciConfig,
    DeciLMConfig,
    FfnBlockConfig,
)
from builder.model.loading import check_checkpoint_tensors, generate_text, load_reference_model
from builder.model.modeling import (
    DeciLMAttention,
    DeciLMDecoderLayer,
    DeciLMForCausalLM,
    DeciLMModel,
)

MODEL_TYPES = (DeciLMConfig.model_type, DeciConfig.model_type)


def register_auto_classes() -> None:
    """Idempotent: safe when the package is imported more than once."""
    for config_class in (DeciLMConfig, DeciConfig):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, DeciLMForCausalLM, exist_ok=True)


register_auto_classes()

__all__ = [
    "MODEL_TYPES",
    "AttentionBlockConfig",
    "BlockConfig",
    "DeciConfig",
    "DeciLMAttention",
    "DeciLMConfig",
    "DeciLMDecoderLayer",
    "DeciLMForCausalLM",
    "DeciLMModel",
    "FfnBlockConfig",
    "check_checkpoint_tensors",
    "generate_text",
    "load_reference_model",
    "register_auto_classes",
]
