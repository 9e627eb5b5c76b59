"""Native PyTorch nemotron-nas (DeciLM) reference model for transformers.

Every layer is one `DeciLMDecoderLayer` whose parts exist only when its plan says so (no-op
parts have no modules and no parameters), with the published HF parameter names:

    model.layers.{i}.input_layernorm              GQA or linear attention
    model.layers.{i}.self_attn.{q,k,v,o}_proj     GQA attention
    model.layers.{i}.self_attn.linear_attn        linear attention
    model.layers.{i}.post_attention_layernorm     gated MLP or linear FFN
    model.layers.{i}.mlp.{gate,up,down}_proj      gated MLP
    model.layers.{i}.mlp.linear_mlp               linear FFN

Written for ModelOpt (see shared/reference/modelopt-fp8.md):
- plain `nn.Linear` everywhere;
- the GQA class name ends in "Attention" and this module defines `ALL_ATTENTION_FUNCTIONS` and
  `eager_attention_forward`, both looked up as module globals at call time, so ModelOpt's KV
  quantizers can swap them; the linear replacement's class name does not end in "Attention"
  (it would get KV quantizers that never see data) but contains "Attention" and "Linear", which
  is how ModelOpt's TensorRT-LLM export recognises a replacing linear;
- one decoder-layer class for all block kinds at `model.model.layers` (layerwise calibration).

KV cache: only GQA layers own one. Each attention module's `layer_idx` is its index in the cache,
i.e. its rank among the attention layers, so a `DynamicCache` holds exactly one entry per
attention layer and `cache.get_seq_length()` (layer 0 of the cache) is always a real attention
layer, whatever the first block of the model is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from builder.arch import AttentionKind, FfnKind, LayerPlan, ModelPlan
from builder.arch.tensors import Role, hf_weight
from builder.model.configuration import DeciLMConfig

__all__ = [
    "ALL_ATTENTION_FUNCTIONS",
    "DeciLMAttention",
    "DeciLMDecoderLayer",
    "DeciLMForCausalLM",
    "DeciLMGatedMLP",
    "DeciLMLinearAttentionReplacement",
    "DeciLMLinearMLPReplacement",
    "DeciLMModel",
    "DeciLMPreTrainedModel",
    "DeciLMRMSNorm",
    "DeciLMRotaryEmbedding",
    "eager_attention_forward",
]

# transformers renamed the cache argument and output field from `past_key_values` to `cache`
# (5.2x); accept both spellings and answer in the one this version's outputs carry.
_CACHE_FIELD = (
    "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
)


def causal_mask(
    config: DeciLMConfig,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: Cache | None,
    position_ids: torch.Tensor,
):
    """transformers' causal mask for this config (None where the attention kernel needs none).

    Positional on purpose: the 4th parameter is `past_key_values` in some transformers 5.x
    releases and `cache` in others (5.17 on the GPU hosts, 5.24 here).
    """
    return create_causal_mask(config, inputs_embeds, attention_mask, cache, position_ids)


class DeciLMRMSNorm(nn.Module):
    """RMSNorm computed in fp32, then scaled by the weight in the input dtype (as Llama does)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x32.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class DeciLMRotaryEmbedding(nn.Module):
    """cos/sin tables for rotate-half RoPE; llama3 scaling through transformers' init functions.

    `inv_freq` is a non-persistent buffer (not in checkpoints); transformers re-initialises
    modules named "*RotaryEmbedding" that carry `original_inv_freq` after loading on meta.
    """

    def __init__(self, config: DeciLMConfig):
        super().__init__()
        self.config = config
        self.rope_type = (config.rope_parameters or {}).get("rope_type", "default")
        init = self.compute_default_rope_parameters
        if self.rope_type != "default":
            init = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = init(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(
        config: DeciLMConfig, device=None, **_
    ) -> tuple[torch.Tensor, float]:
        """Unscaled RoPE: inv_freq[i] = theta ** (-2i / head_dim)."""
        theta = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        exponents = (
            torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float32) / dim
        )
        return 1.0 / (theta**exponents), 1.0

    @torch.no_grad()
    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Angles in fp32 whatever the model dtype: bf16 positions above 256 are not exact.
        inv = self.inv_freq.to(device=x.device, dtype=torch.float32)
        angles = position_ids[..., None].to(torch.float32) * inv
        emb = torch.cat((angles, angles), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """RoPE on [batch, heads, seq, head_dim] tensors with [batch, seq, head_dim] tables."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """[b, kv, s, d] -> [b, kv*groups, s, d]; query head j reads kv head j // groups."""
    if groups == 1:
        return states
    b, kv, s, d = states.shape
    return states[:, :, None].expand(b, kv, groups, s, d).reshape(b, kv * groups, s, d)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **_,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention (fp32 softmax); returns [b, s, heads, d] and the weights."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class DeciLMAttention(nn.Module):
    """Causal GQA self-attention with this layer's own KV-head count.

    `layer_idx` is the index of this layer's entry in the KV cache (its rank among attention
    layers); `block_index` is the model layer it belongs to.
    """

    def __init__(self, config: DeciLMConfig, layer: LayerPlan, cache_index: int):
        super().__init__()
        self.config = config
        self.block_index = layer.index
        self.layer_idx = cache_index
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = layer.kv_heads
        self.num_key_value_groups = self.num_heads // layer.kv_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = float(config.attention_dropout or 0.0)
        self.is_causal = True
        h, q_size, kv_size = (
            config.hidden_size,
            self.num_heads * self.head_dim,
            layer.kv_heads * self.head_dim,
        )
        self.q_proj = nn.Linear(h, q_size, bias=False)
        self.k_proj = nn.Linear(h, kv_size, bias=False)
        self.v_proj = nn.Linear(h, kv_size, bias=False)
        self.o_proj = nn.Linear(q_size, h, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, seq, _ = hidden_states.shape
        heads_shape = (batch, seq, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(heads_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(heads_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(heads_shape).transpose(1, 2)
        query, key = apply_rotary(query, key, *position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        # Resolved at call time from this module's globals: ModelOpt swaps either one in place.
        attend: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attend(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(output.reshape(batch, seq, -1).contiguous()), weights


class DeciLMLinearAttentionReplacement(nn.Module):
    """`replace_with_linear` attention: one hidden x hidden linear, no positions, no cache."""

    def __init__(self, config: DeciLMConfig):
        super().__init__()
        self.linear_attn = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, **_) -> tuple[torch.Tensor, None]:
        return self.linear_attn(hidden_states), None


class DeciLMGatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with this layer's own width."""

    def __init__(self, config: DeciLMConfig, width: int):
        super().__init__()
        h = config.hidden_size
        self.intermediate_size = width
        self.gate_proj = nn.Linear(h, width, bias=False)
        self.up_proj = nn.Linear(h, width, bias=False)
        self.down_proj = nn.Linear(width, h, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DeciLMLinearMLPReplacement(nn.Module):
    """`replace_with_linear` FFN: one hidden x hidden linear."""

    def __init__(self, config: DeciLMConfig):
        super().__init__()
        self.linear_mlp = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_mlp(x)


class DeciLMDecoderLayer(nn.Module):
    """One block of any kind. Absent parts are None: a no-op part adds no norm and no residual."""

    def __init__(self, config: DeciLMConfig, layer: LayerPlan, cache_index: int | None):
        super().__init__()
        self.block_index = layer.index
        self.attention_kind = layer.attention.value
        self.ffn_kind = layer.ffn.value
        eps = config.rms_norm_eps
        self.input_layernorm = self.self_attn = None
        self.post_attention_layernorm = self.mlp = None
        if layer.attention is AttentionKind.ATTENTION:
            self.input_layernorm = DeciLMRMSNorm(config.hidden_size, eps)
            self.self_attn = DeciLMAttention(config, layer, cache_index)
        elif layer.attention is AttentionKind.LINEAR:
            self.input_layernorm = DeciLMRMSNorm(config.hidden_size, eps)
            self.self_attn = DeciLMLinearAttentionReplacement(config)
        if layer.ffn is FfnKind.MLP:
            self.post_attention_layernorm = DeciLMRMSNorm(config.hidden_size, eps)
            self.mlp = DeciLMGatedMLP(config, layer.ffn_width)
        elif layer.ffn is FfnKind.LINEAR:
            self.post_attention_layernorm = DeciLMRMSNorm(config.hidden_size, eps)
            self.mlp = DeciLMLinearMLPReplacement(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if self.self_attn is not None:
            attended, _ = self.self_attn(
                self.input_layernorm(hidden_states),
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                cache=cache,
                **kwargs,
            )
            hidden_states = hidden_states + attended
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


class DeciLMPreTrainedModel(PreTrainedModel):
    config_class = DeciLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules: ClassVar[list[str]] = ["DeciLMDecoderLayer"]
    _skip_keys_device_placement: ClassVar[list[str]] = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = True


def cache_indices(plan: ModelPlan) -> dict[int, int]:
    """Layer index -> KV-cache index, for attention layers only."""
    return {layer.index: n for n, layer in enumerate(plan.attention_layers)}


class DeciLMModel(DeciLMPreTrainedModel):
    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        plan = config.plan
        indices = cache_indices(plan)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            DeciLMDecoderLayer(config, layer, indices.get(layer.index)) for layer in plan.layers
        )
        self.norm = DeciLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = DeciLMRotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Run every block; `output_hidden_states` adds the embeddings and every block's output."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        kwargs.pop("return_dict", None)
        kwargs.pop("output_attentions", None)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache()  # filled lazily: one entry per attention layer
        if position_ids is None:
            seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(
                seen, seen + inputs_embeds.shape[1], device=inputs_embeds.device
            )
            position_ids = position_ids.unsqueeze(0)
        mask = causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids)
        hidden = inputs_embeds
        position_embeddings = self.rotary_emb(hidden, position_ids)
        states = [hidden] if output_hidden_states else None
        for layer in self.layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                cache=cache,
                **kwargs,
            )
            if states is not None:
                states.append(hidden)
        return BaseModelOutputWithPast(
            last_hidden_state=self.norm(hidden),
            hidden_states=tuple(states) if states is not None else None,
            **{_CACHE_FIELD: cache if use_cache else None},
        )


class DeciLMForCausalLM(DeciLMPreTrainedModel, GenerationMixin):
    """nemotron-nas causal LM; `save_pretrained` writes architectures ["DeciLMForCausalLM"]."""

    _tied_weights_keys: ClassVar[dict[str, str]] = {
        hf_weight(Role.LM_HEAD): hf_weight(Role.EMBEDDING)
    }

    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        self.model = DeciLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @property
    def plan(self) -> ModelPlan:
        return self.config.plan

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (and the shifted next-token loss when `labels` is given)."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:, :] if logits_to_keep > 0 else hidden
        else:
            hidden = hidden[:, logits_to_keep, :]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
        )
