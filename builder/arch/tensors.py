"""Tensor-name tables per block kind and the per-rank layout they imply.

One table says, for each part of a block, which HF tensors exist, which TensorRT-LLM
tensor they become and how that tensor is split across tensor-parallel ranks. Convert,
check, plan and quantize all read it; nothing else spells these names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from builder.arch.plan import AttentionKind, FfnKind, LayerPlan, ModelPlan
from builder.errors import ParallelismError


class Split(StrEnum):
    REPLICATED = "replicated"
    COLUMN = "column"  # dim 0 (output features) in tp equal chunks
    ROW = "row"  # dim 1 (input features) in tp equal chunks
    QKV = "qkv"  # per rank [q | k | v]; kv heads duplicated when tp > kv
    VOCAB = "vocab"  # dim 0, zero-padded to a multiple of tp first


@dataclass(frozen=True)
class TensorRule:
    """One TensorRT-LLM tensor: its name, its HF sources and its TP split.

    `target` uses {j} for the stage-local layer index; `sources` use {i} for the global one.
    """

    target: str
    sources: tuple[str, ...]
    split: Split
    linear: bool = False  # a linear weight: FP8-quantized, carries scaling factors

    def target_name(self, local_index: int | None = None) -> str:
        return self.target.format(j=local_index)

    def source_names(self, index: int | None = None) -> tuple[str, ...]:
        return tuple(s.format(i=index) for s in self.sources)


_L = "model.layers.{i}."
_T = "transformer.layers.{j}."

ATTENTION_RULES: dict[AttentionKind, tuple[TensorRule, ...]] = {
    AttentionKind.ATTENTION: (
        TensorRule(
            _T + "input_layernorm.weight", (_L + "input_layernorm.weight",), Split.REPLICATED
        ),
        TensorRule(
            _T + "attention.qkv.weight",
            tuple(_L + f"self_attn.{p}_proj.weight" for p in "qkv"),
            Split.QKV,
            linear=True,
        ),
        TensorRule(
            _T + "attention.dense.weight", (_L + "self_attn.o_proj.weight",), Split.ROW, True
        ),
    ),
    AttentionKind.LINEAR: (
        TensorRule(
            _T + "input_layernorm.weight", (_L + "input_layernorm.weight",), Split.REPLICATED
        ),
        TensorRule(
            _T + "attention.weight", (_L + "self_attn.linear_attn.weight",), Split.COLUMN, True
        ),
    ),
    AttentionKind.NO_OP: (),
}

# TensorRT-LLM computes proj(silu(fc(x)) * gate(x)): fc is HF's gate_proj, gate is up_proj.
FFN_RULES: dict[FfnKind, tuple[TensorRule, ...]] = {
    FfnKind.MLP: (
        TensorRule(
            _T + "post_layernorm.weight",
            (_L + "post_attention_layernorm.weight",),
            Split.REPLICATED,
        ),
        TensorRule(_T + "ffn.fc.weight", (_L + "mlp.gate_proj.weight",), Split.COLUMN, True),
        TensorRule(_T + "ffn.gate.weight", (_L + "mlp.up_proj.weight",), Split.COLUMN, True),
        TensorRule(_T + "ffn.proj.weight", (_L + "mlp.down_proj.weight",), Split.ROW, True),
    ),
    FfnKind.LINEAR: (
        TensorRule(
            _T + "post_layernorm.weight",
            (_L + "post_attention_layernorm.weight",),
            Split.REPLICATED,
        ),
        TensorRule(_T + "ffn.weight", (_L + "mlp.linear_mlp.weight",), Split.COLUMN, True),
    ),
    FfnKind.NO_OP: (),
}

EMBEDDING_RULE = TensorRule(
    "transformer.vocab_embedding.weight", ("model.embed_tokens.weight",), Split.REPLICATED
)
FINAL_NORM_RULE = TensorRule("transformer.ln_f.weight", ("model.norm.weight",), Split.REPLICATED)
LM_HEAD_RULE = TensorRule("lm_head.weight", ("lm_head.weight",), Split.VOCAB)
TIED_LM_HEAD_RULE = TensorRule("lm_head.weight", ("model.embed_tokens.weight",), Split.VOCAB)


def layer_rules(layer: LayerPlan) -> tuple[TensorRule, ...]:
    return ATTENTION_RULES[layer.attention] + FFN_RULES[layer.ffn]


def lm_head_rule(plan: ModelPlan) -> TensorRule:
    return TIED_LM_HEAD_RULE if plan.tie_word_embeddings else LM_HEAD_RULE


# ---- HF side ----------------------------------------------------------------------------
def layer_hf_shapes(plan: ModelPlan, layer: LayerPlan) -> dict[str, tuple[int, ...]]:
    """The HF tensors of one block with their shapes; a fully no-op block has none."""
    h, hd, p = plan.hidden_size, plan.head_dim, f"model.layers.{layer.index}."
    shapes: dict[str, tuple[int, ...]] = {}
    if layer.attention is not AttentionKind.NO_OP:
        shapes[p + "input_layernorm.weight"] = (h,)
    if layer.attention is AttentionKind.ATTENTION:
        kv = layer.kv_heads * hd
        shapes[p + "self_attn.q_proj.weight"] = (plan.q_size, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, plan.q_size)
    elif layer.attention is AttentionKind.LINEAR:
        shapes[p + "self_attn.linear_attn.weight"] = (h, h)
    if layer.ffn is not FfnKind.NO_OP:
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    if layer.ffn is FfnKind.MLP:
        shapes[p + "mlp.gate_proj.weight"] = (layer.ffn_width, h)
        shapes[p + "mlp.up_proj.weight"] = (layer.ffn_width, h)
        shapes[p + "mlp.down_proj.weight"] = (h, layer.ffn_width)
    elif layer.ffn is FfnKind.LINEAR:
        shapes[p + "mlp.linear_mlp.weight"] = (h, h)
    return shapes


def global_hf_shapes(plan: ModelPlan) -> dict[str, tuple[int, ...]]:
    shapes = {
        "model.embed_tokens.weight": (plan.vocab_size, plan.hidden_size),
        "model.norm.weight": (plan.hidden_size,),
    }
    if not plan.tie_word_embeddings:
        shapes["lm_head.weight"] = (plan.vocab_size, plan.hidden_size)
    return shapes


def hf_tensor_shapes(plan: ModelPlan) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF checkpoint of this plan holds, with its shape, in model order."""
    glob = global_hf_shapes(plan)
    shapes = {"model.embed_tokens.weight": glob.pop("model.embed_tokens.weight")}
    for layer in plan.layers:
        shapes.update(layer_hf_shapes(plan, layer))
    shapes.update(glob)
    return shapes


# ---- parallel layout ----------------------------------------------------------------------
def parallelism_problems(plan: ModelPlan, tp: int, pp: int = 1) -> list[str]:
    """Every reason the model cannot be split tp x pp, each naming the layer or field."""
    problems: list[str] = []
    if tp < 1 or pp < 1:
        return [f"tp ({tp}) and pp ({pp}) must be positive"]
    if plan.num_attention_heads % tp:
        problems.append(
            f"num_attention_heads {plan.num_attention_heads} is not divisible by tp {tp}"
        )
    if plan.num_layers % pp:
        problems.append(f"num_hidden_layers {plan.num_layers} is not divisible by pp {pp}")
    for layer in plan.layers:
        name = f"layer {layer.index}"
        if layer.attention is AttentionKind.ATTENTION:
            kv = layer.kv_heads
            if (tp > kv and tp % kv) or (tp <= kv and kv % tp):
                problems.append(
                    f"{name}: {kv} KV heads cannot be split over tp {tp} "
                    "(tp must divide the KV heads, or be a multiple of them)"
                )
        linear = layer.attention is AttentionKind.LINEAR or layer.ffn is FfnKind.LINEAR
        if linear and plan.hidden_size % tp:
            problems.append(
                f"{name}: linear replacement width {plan.hidden_size} not divisible by tp {tp}"
            )
        if layer.ffn is FfnKind.MLP and layer.ffn_width % tp:
            problems.append(f"{name}: FFN width {layer.ffn_width} is not divisible by tp {tp}")
    return problems


def check_parallelism(plan: ModelPlan, tp: int, pp: int = 1) -> None:
    problems = parallelism_problems(plan, tp, pp)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ParallelismError(f"{plan.source}: cannot use tp={tp} pp={pp}: {problems[0]}{more}")


def stage_layers(plan: ModelPlan, pp: int, pp_rank: int) -> range:
    """Global layer indices of pipeline stage `pp_rank` (equal layer counts, as TRT-LLM loads)."""
    if plan.num_layers % pp:
        raise ParallelismError(f"num_hidden_layers {plan.num_layers} is not divisible by pp {pp}")
    per_stage = plan.num_layers // pp
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


def kv_heads_per_rank(kv_heads: int, tp: int) -> int:
    return math.ceil(kv_heads / tp)


def rank_shape(
    plan: ModelPlan, rule: TensorRule, layer: LayerPlan | None, tp: int
) -> tuple[int, ...]:
    """Shape of `rule`'s tensor on one TP rank."""
    h = plan.hidden_size
    if rule.split is Split.QKV:
        rows = (
            plan.num_attention_heads // tp + 2 * kv_heads_per_rank(layer.kv_heads, tp)
        ) * plan.head_dim
        return (rows, h)
    full = _full_shape(plan, rule, layer)
    if rule.split is Split.REPLICATED:
        return full
    if rule.split is Split.COLUMN:
        return (full[0] // tp, *full[1:])
    if rule.split is Split.ROW:
        return (full[0], full[1] // tp)
    if rule.split is Split.VOCAB:
        return (math.ceil(full[0] / tp), full[1])
    raise AssertionError(rule.split)


def _full_shape(plan: ModelPlan, rule: TensorRule, layer: LayerPlan | None) -> tuple[int, ...]:
    shapes = layer_hf_shapes(plan, layer) if layer else global_hf_shapes(plan)
    source = rule.source_names(layer.index if layer else None)[0]
    if source == "model.embed_tokens.weight":
        return (plan.vocab_size, plan.hidden_size)
    return shapes[source]


@dataclass(frozen=True)
class RankTensor:
    """One tensor of one rank file, in the order it is written."""

    name: str
    shape: tuple[int, ...]
    rule: TensorRule
    layer: LayerPlan | None  # None for embedding, final norm, lm_head

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def rank_tensors(plan: ModelPlan, tp: int, pp: int, rank: int) -> list[RankTensor]:
    """Every tensor of rank{rank}.safetensors, in write order, with per-rank shapes."""
    check_parallelism(plan, tp, pp)
    pp_rank, world = rank // tp, tp * pp
    if not 0 <= rank < world:
        raise ParallelismError(f"rank {rank} is outside 0..{world - 1} for tp={tp} pp={pp}")
    stage = stage_layers(plan, pp, pp_rank)
    out: list[RankTensor] = []
    if pp_rank == 0:
        out.append(
            RankTensor(
                EMBEDDING_RULE.target,
                rank_shape(plan, EMBEDDING_RULE, None, tp),
                EMBEDDING_RULE,
                None,
            )
        )
    for local, index in enumerate(stage):
        layer = plan.layers[index]
        for rule in layer_rules(layer):
            out.append(
                RankTensor(rule.target_name(local), rank_shape(plan, rule, layer, tp), rule, layer)
            )
    if pp_rank == pp - 1:
        for rule in (FINAL_NORM_RULE, lm_head_rule(plan)):
            out.append(RankTensor(rule.target, rank_shape(plan, rule, None, tp), rule, None))
    return out


# ---- FP8 (per-tensor) companions ---------------------------------------------------------------
# A quantized linear `<lin>.weight` carries two float32 [1] scales; a quantized KV cache adds one
# per attention layer. Names as TensorRT-LLM's loader expects them (trtllm-checkpoint.md §5).
WEIGHTS_SCALE = "weights_scaling_factor"
ACTIVATION_SCALE = "activation_scaling_factor"
KV_CACHE_SCALE = "kv_cache_scaling_factor"


def linear_module(weight_name: str) -> str:
    """`transformer.layers.3.ffn.fc.weight` -> `transformer.layers.3.ffn.fc` (what exclude_modules
    matches)."""
    return weight_name.removesuffix(".weight")


def scale_names(weight_name: str) -> tuple[str, str]:
    """(weights_scaling_factor, activation_scaling_factor) names of a linear weight."""
    module = linear_module(weight_name)
    return f"{module}.{WEIGHTS_SCALE}", f"{module}.{ACTIVATION_SCALE}"


def kv_cache_scale_name(local_index: int) -> str:
    return f"transformer.layers.{local_index}.attention.{KV_CACHE_SCALE}"
