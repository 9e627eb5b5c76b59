"""Tensor roles as data: every tensor name of every format, and the per-rank layout they imply.

One table, `ROLES`, says for each role of a tensor (the embedding, a block's norms, q/k/v/o,
linear attention, gate/up/down, the linear FFN, the final norm, lm_head) its HF module, its
TensorRT-LLM module, its GGUF name, how TensorRT-LLM splits it across tensor-parallel ranks,
which group it is fused and FP8-scaled with, and which ModelOpt quantizers calibrate it.
`BLOCK_ROLES` says which roles each block kind has. Everything else (convert, check, plan,
the runtimes, calibration, both exporters, synth, smollm2, verify) derives names from here;
nothing else spells a tensor name or reads a layer index out of one: `parse_hf_name` does,
and raises for a name no role maps (as llama.cpp's gguf-py tensor map does).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, StrEnum

from builder.arch.plan import AttentionKind, FfnKind, LayerPlan, ModelPlan
from builder.errors import ParallelismError, UserError


class Split(StrEnum):
    REPLICATED = "replicated"
    COLUMN = "column"  # dim 0 (output features) in tp equal chunks
    ROW = "row"  # dim 1 (input features) in tp equal chunks
    QKV = "qkv"  # per rank [q | k | v]; kv heads duplicated when tp > kv
    VOCAB = "vocab"  # dim 0, zero-padded to a multiple of tp first


class Role(Enum):
    """What a tensor is for; the values are llama.cpp's GGUF base names."""

    EMBEDDING = "token_embd"
    ATTN_NORM = "attn_norm"
    ATTN_Q = "attn_q"
    ATTN_K = "attn_k"
    ATTN_V = "attn_v"
    ATTN_OUT = "attn_output"
    ATTN_LINEAR = "attn_linear"
    FFN_NORM = "ffn_norm"
    FFN_GATE = "ffn_gate"
    FFN_UP = "ffn_up"
    FFN_DOWN = "ffn_down"
    FFN_LINEAR = "ffn_linear"
    FINAL_NORM = "output_norm"
    LM_HEAD = "output"


class Group(Enum):
    """Linears that read the same input. TensorRT-LLM fuses qkv into one tensor and the
    runtimes fuse gate+up into one GEMM, so each group shares one FP8 weight scale and one
    activation scale (the max of its members'); the unified HF checkpoint shares the input
    scale only."""

    QKV = "qkv"
    GATE_UP = "gate_up"


Shape = Callable[[ModelPlan, "LayerPlan | None"], tuple[int, ...]]


@dataclass(frozen=True)
class RoleSpec:
    """One role in every format. Module paths use {i} for the global layer index (HF, GGUF)
    and {j} for the pipeline-stage-local one (TensorRT-LLM); a tensor is `<module>.weight`."""

    role: Role
    hf: str
    trtllm: str
    gguf: str | None  # None: llama.cpp has no such tensor (a NAS replacement)
    split: Split
    shape: Shape  # the whole (unsplit) HF tensor's shape
    linear: bool = False  # FP8-quantized, carries scales, calibrated by ModelOpt quantizers
    fused: Group | None = None  # members of one TensorRT-LLM tensor / one runtime GEMM
    scale_group: Group | None = None  # members sharing FP8 scales
    cache: str | None = None  # "k" / "v": the KV-cache half this projection fills

    def hf_module(self, layer: int | None = None) -> str:
        return self.hf.format(i=layer)

    def hf_weight(self, layer: int | None = None) -> str:
        return f"{self.hf_module(layer)}.{WEIGHT}"

    def trtllm_module(self, local: int | None = None) -> str:
        return self.trtllm.format(j=local)

    def trtllm_weight(self, local: int | None = None) -> str:
        return f"{self.trtllm_module(local)}.{WEIGHT}"

    def gguf_weight(self, layer: int | None = None) -> str:
        if self.gguf is None:
            raise UnknownTensorName(f"{self.role.value}: no GGUF tensor for this role")
        return f"{self.gguf.format(i=layer)}.{WEIGHT}"

    def quantizers(self, layer: int | None = None) -> tuple[str, ...]:
        """ModelOpt quantizer paths calibrating this role (a linear's weight and input
        quantizers; a k/v projection adds its cache's bmm quantizer)."""
        if not self.linear:
            return ()
        module = self.hf_module(layer)
        found = (f"{module}.{WEIGHT_QUANTIZER}", f"{module}.{INPUT_QUANTIZER}")
        return found + ((kv_quantizer(self.cache, layer),) if self.cache else ())


WEIGHT = "weight"

# ---- per-format prefixes and scale / quantizer names ----------------------------------------
_HF_LAYER = "model.layers.{i}"
_HF_ATTENTION = _HF_LAYER + ".self_attn"
_HF_MLP = _HF_LAYER + ".mlp"
_TRT_LAYER = "transformer.layers.{j}"
_TRT_ATTENTION = _TRT_LAYER + ".attention"
_TRT_FFN = _TRT_LAYER + ".ffn"
_GGUF_LAYER = "blk.{i}"

# TensorRT-LLM per-tensor FP8 (trtllm-checkpoint.md §5): two fp32 [1] scales per linear, one
# KV-cache scale per attention layer.
WEIGHTS_SCALE = "weights_scaling_factor"
ACTIVATION_SCALE = "activation_scaling_factor"
KV_CACHE_SCALE = "kv_cache_scaling_factor"
# TensorRT-LLM per-channel FP8 (Fp8RowwiseLinear, FP8_PER_CHANNEL_PER_TOKEN): one fp32 [out]
# weight scale per linear instead of the two [1] scales; activations are scaled per token at
# run time. The unified HF checkpoint stores it as `weight_scale` of shape [out].
PER_CHANNEL_SCALE = "per_channel_scale"
# ModelOpt's quantizers and the unified HF checkpoint's 0-dim scales.
WEIGHT_QUANTIZER = "weight_quantizer"
INPUT_QUANTIZER = "input_quantizer"
BMM_QUANTIZER = "{cache}_bmm_quantizer"
HF_WEIGHT_SCALE = "weight_scale"
HF_INPUT_SCALE = "input_scale"
HF_KV_SCALE = "{cache}_scale"
HF_SCALE_SUFFIXES = (
    HF_WEIGHT_SCALE,
    HF_INPUT_SCALE,
    HF_KV_SCALE.format(cache="k"),
    HF_KV_SCALE.format(cache="v"),
)
# What every TensorRT-LLM FP8 scale's name ends with (per-tensor and per-channel).
TRTLLM_SCALE_SUFFIXES = ("scaling_factor", PER_CHANNEL_SCALE)
# What every FP8 scale tensor's name ends with, in either format (finds quantized inputs).
FP8_SCALE_SUFFIXES = (HF_WEIGHT_SCALE, HF_INPUT_SCALE, "scaling_factor", PER_CHANNEL_SCALE)
QUANTIZER_KINDS = (
    WEIGHT_QUANTIZER,
    INPUT_QUANTIZER,
    BMM_QUANTIZER.format(cache="k"),
    BMM_QUANTIZER.format(cache="v"),
)


def _h(plan: ModelPlan, layer: LayerPlan | None) -> tuple[int, ...]:
    return (plan.hidden_size,)


def _hh(plan: ModelPlan, layer: LayerPlan | None) -> tuple[int, ...]:
    return (plan.hidden_size, plan.hidden_size)


def _vocab(plan: ModelPlan, layer: LayerPlan | None) -> tuple[int, ...]:
    return (plan.vocab_size, plan.hidden_size)


def _kv(plan: ModelPlan, layer: LayerPlan | None) -> tuple[int, ...]:
    return (layer.kv_heads * plan.head_dim, plan.hidden_size)


def _width_in(plan: ModelPlan, layer: LayerPlan | None) -> tuple[int, ...]:
    return (layer.ffn_width, plan.hidden_size)


_LIN = {"linear": True}
_QKV = {"linear": True, "fused": Group.QKV, "scale_group": Group.QKV}
# TensorRT-LLM computes proj(silu(fc(x)) * gate(x)): fc is HF's gate_proj, gate is up_proj.
_GATE_UP = {"linear": True, "fused": Group.GATE_UP, "scale_group": Group.GATE_UP}

ROLES: dict[Role, RoleSpec] = {
    s.role: s
    for s in (
        RoleSpec(Role.EMBEDDING, "model.embed_tokens", "transformer.vocab_embedding", "token_embd",
                 Split.REPLICATED, _vocab),
        RoleSpec(Role.ATTN_NORM, _HF_LAYER + ".input_layernorm", _TRT_LAYER + ".input_layernorm",
                 _GGUF_LAYER + ".attn_norm", Split.REPLICATED, _h),
        RoleSpec(Role.ATTN_Q, _HF_ATTENTION + ".q_proj", _TRT_ATTENTION + ".qkv",
                 _GGUF_LAYER + ".attn_q", Split.QKV,
                 lambda plan, layer: (plan.q_size, plan.hidden_size), **_QKV),
        RoleSpec(Role.ATTN_K, _HF_ATTENTION + ".k_proj", _TRT_ATTENTION + ".qkv",
                 _GGUF_LAYER + ".attn_k", Split.QKV, _kv, cache="k", **_QKV),
        RoleSpec(Role.ATTN_V, _HF_ATTENTION + ".v_proj", _TRT_ATTENTION + ".qkv",
                 _GGUF_LAYER + ".attn_v", Split.QKV, _kv, cache="v", **_QKV),
        RoleSpec(Role.ATTN_OUT, _HF_ATTENTION + ".o_proj", _TRT_ATTENTION + ".dense",
                 _GGUF_LAYER + ".attn_output", Split.ROW,
                 lambda plan, layer: (plan.hidden_size, plan.q_size), **_LIN),
        RoleSpec(Role.ATTN_LINEAR, _HF_ATTENTION + ".linear_attn", _TRT_ATTENTION, None,
                 Split.COLUMN, _hh, **_LIN),
        RoleSpec(Role.FFN_NORM, _HF_LAYER + ".post_attention_layernorm",
                 _TRT_LAYER + ".post_layernorm", _GGUF_LAYER + ".ffn_norm", Split.REPLICATED, _h),
        RoleSpec(Role.FFN_GATE, _HF_MLP + ".gate_proj", _TRT_FFN + ".fc",
                 _GGUF_LAYER + ".ffn_gate", Split.COLUMN, _width_in, **_GATE_UP),
        RoleSpec(Role.FFN_UP, _HF_MLP + ".up_proj", _TRT_FFN + ".gate",
                 _GGUF_LAYER + ".ffn_up", Split.COLUMN, _width_in, **_GATE_UP),
        RoleSpec(Role.FFN_DOWN, _HF_MLP + ".down_proj", _TRT_FFN + ".proj",
                 _GGUF_LAYER + ".ffn_down", Split.ROW,
                 lambda plan, layer: (plan.hidden_size, layer.ffn_width), **_LIN),
        RoleSpec(Role.FFN_LINEAR, _HF_MLP + ".linear_mlp", _TRT_FFN, None, Split.COLUMN, _hh,
                 **_LIN),
        RoleSpec(Role.FINAL_NORM, "model.norm", "transformer.ln_f", "output_norm",
                 Split.REPLICATED, _h),
        # lm_head is a linear, but FP8 recipes exclude it: it stays in the model dtype.
        RoleSpec(Role.LM_HEAD, "lm_head", "lm_head", "output", Split.VOCAB, _vocab),
    )
}  # fmt: skip

# The roles of each block kind, in checkpoint order. A new kind adds one entry here.
ATTENTION_ROLES: dict[AttentionKind, tuple[Role, ...]] = {
    AttentionKind.ATTENTION: (Role.ATTN_NORM, Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V, Role.ATTN_OUT),
    AttentionKind.LINEAR: (Role.ATTN_NORM, Role.ATTN_LINEAR),
    AttentionKind.NO_OP: (),
}
FFN_ROLES: dict[FfnKind, tuple[Role, ...]] = {
    FfnKind.MLP: (Role.FFN_NORM, Role.FFN_GATE, Role.FFN_UP, Role.FFN_DOWN),
    FfnKind.LINEAR: (Role.FFN_NORM, Role.FFN_LINEAR),
    FfnKind.NO_OP: (),
}


def block_roles(layer: LayerPlan) -> tuple[Role, ...]:
    return ATTENTION_ROLES[layer.attention] + FFN_ROLES[layer.ffn]


def group_roles(group: Group) -> tuple[Role, ...]:
    """The members of a scale group, in table order."""
    return tuple(r for r, s in ROLES.items() if s.scale_group is group)


def fused_roles(group: Group) -> tuple[Role, ...]:
    """The members of a fused group, in the order their rows are stacked."""
    return tuple(r for r, s in ROLES.items() if s.fused is group)


def hf_module(role: Role, layer: int | None = None) -> str:
    return ROLES[role].hf_module(layer)


def hf_weight(role: Role, layer: int | None = None) -> str:
    return ROLES[role].hf_weight(layer)


def trtllm_module(role: Role, local: int | None = None) -> str:
    return ROLES[role].trtllm_module(local)


def trtllm_weight(role: Role, local: int | None = None) -> str:
    return ROLES[role].trtllm_weight(local)


# ---- GEMM units: the linears one GEMM runs (what a per-linear format is assigned to) --------
# A fused group (qkv, gate+up) is one GEMM in TensorRT-LLM and the runtimes, so its members
# take one format; every other linear is a unit of its own, named here.
UNIT_NAMES: dict[Role, str] = {
    Role.ATTN_OUT: "o",
    Role.ATTN_LINEAR: "linear_attn",
    Role.FFN_DOWN: "down",
    Role.FFN_LINEAR: "linear_mlp",
}


def layer_units(layer: LayerPlan) -> list[tuple[str, tuple[Role, ...]]]:
    """(unit name, its roles) for each GEMM of the block, in execution order."""
    units: list[tuple[str, tuple[Role, ...]]] = []
    for role in block_roles(layer):
        spec = ROLES[role]
        if not spec.linear:
            continue
        if spec.fused is not None:
            if not units or units[-1][0] != spec.fused.value:
                units.append((spec.fused.value, fused_roles(spec.fused)))
            continue
        units.append((UNIT_NAMES[role], (role,)))
    return units


def trtllm_module_templates(roles: tuple[Role, ...]) -> tuple[str, ...]:
    """The TensorRT-LLM modules of `roles` with the stage-local index left as {j}, in order,
    each once (q, k and v share one)."""
    return tuple(dict.fromkeys(ROLES[r].trtllm for r in roles))


def hf_layer_prefix(layer: int) -> str:
    """What every HF name of block `layer` starts with (module paths inside the block follow)."""
    return f"{_HF_LAYER.format(i=layer)}."


def hf_attention_module(layer: int) -> str:
    """The HF attention module of block `layer` (where ModelOpt puts the k/v bmm quantizers)."""
    return _HF_ATTENTION.format(i=layer)


# ---- ModelOpt quantizers and scale names ----------------------------------------------------
def kv_quantizer(cache: str, layer: int | None) -> str:
    """ModelOpt's k/v bmm quantizer of an attention layer (it sits on the attention module)."""
    return f"{hf_attention_module(layer)}.{BMM_QUANTIZER.format(cache=cache)}"


def hf_kv_scale_name(role: Role, layer: int) -> str:
    """The unified HF checkpoint's cache scale, on the k or v projection."""
    spec = ROLES[role]
    return f"{spec.hf_module(layer)}.{HF_KV_SCALE.format(cache=spec.cache)}"


def hf_scale_names(module: str) -> tuple[str, str]:
    """(weight_scale, input_scale) of an HF linear module in the unified FP8 checkpoint."""
    return f"{module}.{HF_WEIGHT_SCALE}", f"{module}.{HF_INPUT_SCALE}"


def hf_channel_scale_name(module: str) -> str:
    """The per-channel weight scale (fp32 [out]) of an HF linear module: ModelOpt's
    FP8_PER_CHANNEL_PER_TOKEN export keeps the name `weight_scale` and stores no input scale."""
    return f"{module}.{HF_WEIGHT_SCALE}"


def cache_roles() -> tuple[Role, ...]:
    """The projections that fill the KV cache (k, then v)."""
    return tuple(r for r, s in ROLES.items() if s.cache)


# ---- reading names back ---------------------------------------------------------------------
class UnknownTensorName(UserError):
    """A tensor or quantizer name that no role maps."""


@dataclass(frozen=True)
class HfName:
    """An HF tensor or ModelOpt quantizer name read back: role, global layer, what follows."""

    role: Role
    layer: int | None
    suffix: str  # "weight", "weight_quantizer", "k_scale", "k_bmm_quantizer", ...


def _pattern(template: str) -> str:
    return re.escape(template).replace(re.escape("{i}"), r"(?P<layer>\d+)")


_HF_NAME_PATTERNS = [
    (role, re.compile(_pattern(spec.hf) + r"\.(?P<suffix>[A-Za-z_]+)"))
    for role, spec in ROLES.items()
] + [
    (
        role,
        re.compile(_pattern(_HF_ATTENTION) + rf"\.(?P<suffix>{ROLES[role].cache}_bmm_quantizer)"),
    )
    for role in cache_roles()
]


def parse_hf_name(name: str) -> HfName:
    """Role, layer and suffix of an HF tensor / ModelOpt quantizer path; raises for names no
    role maps."""
    for role, pattern in _HF_NAME_PATTERNS:
        match = pattern.fullmatch(name)
        if match:
            layer = match.groupdict().get("layer")
            return HfName(role, None if layer is None else int(layer), match["suffix"])
    raise UnknownTensorName(f"tensor {name!r}: no tensor role has this name")


_HF_LAYER_PREFIX = re.compile(_pattern(_HF_LAYER) + r"\.")


def hf_layer_of(name: str) -> int | None:
    """The global layer index an HF name sits in (None: model-level), mapped by a role or not
    (so messages about unmapped names can still say which layer they are in)."""
    match = _HF_LAYER_PREFIX.match(name)
    return None if match is None else int(match["layer"])


def split_hf_layer(name: str) -> tuple[int | None, str]:
    """(global layer, the name inside the layer), e.g. (3, "self_attn.q_proj.weight"); a
    model-level name is (None, name)."""
    layer = hf_layer_of(name)
    if layer is None:
        return None, name
    return layer, name.removeprefix(hf_layer_prefix(layer))


# ---- TensorRT-LLM tensors and their HF sources -----------------------------------------------
@dataclass(frozen=True)
class TensorRule:
    """One TensorRT-LLM tensor: its name, its HF sources and its TP split.

    `target` uses {j} for the stage-local layer index; `sources` use {i} for the global one.
    """

    target: str
    sources: tuple[str, ...]
    split: Split
    linear: bool = False  # a linear weight: FP8-quantized, carries scaling factors
    roles: tuple[Role, ...] = ()  # the roles whose HF tensors `sources` are

    def __post_init__(self) -> None:
        if not self.roles:
            raise ValueError(f"{self.target}: a tensor rule needs the roles of its sources")

    def target_name(self, local_index: int | None = None) -> str:
        return self.target.format(j=local_index)

    def source_names(self, index: int | None = None) -> tuple[str, ...]:
        return tuple(s.format(i=index) for s in self.sources)

    @property
    def role(self) -> Role:
        """The first source's role (the one a fused tensor is named for in messages)."""
        return self.roles[0]


def _rules(roles: tuple[Role, ...]) -> tuple[TensorRule, ...]:
    """One rule per TensorRT-LLM tensor: consecutive roles with one target fuse into it."""
    rules: list[TensorRule] = []
    for role in roles:
        spec = ROLES[role]
        target = f"{spec.trtllm}.{WEIGHT}"
        if rules and rules[-1].target == target:
            last = rules.pop()
            if spec.fused is None or spec.fused is not ROLES[last.role].fused:
                raise AssertionError(f"{role} shares {target} without a fused group")
            rules.append(
                TensorRule(
                    target,
                    (*last.sources, f"{spec.hf}.{WEIGHT}"),
                    last.split,
                    last.linear,
                    (*last.roles, role),
                )
            )
        else:
            rules.append(
                TensorRule(target, (f"{spec.hf}.{WEIGHT}",), spec.split, spec.linear, (role,))
            )
    return tuple(rules)


ATTENTION_RULES: dict[AttentionKind, tuple[TensorRule, ...]] = {
    kind: _rules(roles) for kind, roles in ATTENTION_ROLES.items()
}
FFN_RULES: dict[FfnKind, tuple[TensorRule, ...]] = {
    kind: _rules(roles) for kind, roles in FFN_ROLES.items()
}
(EMBEDDING_RULE,) = _rules((Role.EMBEDDING,))
(FINAL_NORM_RULE,) = _rules((Role.FINAL_NORM,))
(LM_HEAD_RULE,) = _rules((Role.LM_HEAD,))
TIED_LM_HEAD_RULE = TensorRule(
    LM_HEAD_RULE.target, EMBEDDING_RULE.sources, Split.VOCAB, False, (Role.LM_HEAD,)
)


def layer_rules(layer: LayerPlan) -> tuple[TensorRule, ...]:
    return ATTENTION_RULES[layer.attention] + FFN_RULES[layer.ffn]


def lm_head_rule(plan: ModelPlan) -> TensorRule:
    return TIED_LM_HEAD_RULE if plan.tie_word_embeddings else LM_HEAD_RULE


# ---- HF side ----------------------------------------------------------------------------
def layer_hf_shapes(plan: ModelPlan, layer: LayerPlan) -> dict[str, tuple[int, ...]]:
    """The HF tensors of one block with their shapes; a fully no-op block has none."""
    return {
        ROLES[role].hf_weight(layer.index): ROLES[role].shape(plan, layer)
        for role in block_roles(layer)
    }


def layer_linears(plan: ModelPlan, layer: LayerPlan) -> list[str]:
    """HF module paths of the block's linears (what FP8 quantizes), in checkpoint order."""
    return [ROLES[role].hf_module(layer.index) for role in block_roles(layer) if ROLES[role].linear]


def _global_roles(plan: ModelPlan) -> tuple[Role, ...]:
    tied = plan.tie_word_embeddings
    return (Role.FINAL_NORM,) if tied else (Role.FINAL_NORM, Role.LM_HEAD)


def global_hf_shapes(plan: ModelPlan) -> dict[str, tuple[int, ...]]:
    return {
        ROLES[role].hf_weight(): ROLES[role].shape(plan, None)
        for role in (Role.EMBEDDING, *_global_roles(plan))
    }


def hf_tensor_shapes(plan: ModelPlan) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF checkpoint of this plan holds, with its shape, in model order."""
    glob = global_hf_shapes(plan)
    embedding = hf_weight(Role.EMBEDDING)
    shapes = {embedding: glob.pop(embedding)}
    for layer in plan.layers:
        shapes.update(layer_hf_shapes(plan, layer))
    shapes.update(glob)
    return shapes


def optional_hf_shapes(plan: ModelPlan) -> dict[str, tuple[int, ...]]:
    """Tensors an HF checkpoint of this plan may hold besides `hf_tensor_shapes`: an lm_head
    copy of a tied embedding."""
    if not plan.tie_word_embeddings:
        return {}
    return {hf_weight(Role.LM_HEAD): ROLES[Role.LM_HEAD].shape(plan, None)}


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
    return ROLES[rule.role].shape(plan, layer)


@dataclass(frozen=True)
class RankTensor:
    """One tensor of one rank file, in the order it is written."""

    name: str
    shape: tuple[int, ...]
    rule: TensorRule
    layer: LayerPlan | None  # None for embedding, final norm, lm_head
    local: int | None = None  # the layer's stage-local index (the one in `name`)
    tp_rank: int = 0  # which tensor-parallel slice of its source this is

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def rank_tensors(plan: ModelPlan, tp: int, pp: int, rank: int) -> list[RankTensor]:
    """Every tensor of rank{rank}.safetensors, in write order, with per-rank shapes."""
    check_parallelism(plan, tp, pp)
    pp_rank, world = rank // tp, tp * pp
    if not 0 <= rank < world:
        raise ParallelismError(f"rank {rank} is outside 0..{world - 1} for tp={tp} pp={pp}")
    stage, tp_rank = stage_layers(plan, pp, pp_rank), rank % tp
    out: list[RankTensor] = []
    if pp_rank == 0:
        out.append(
            RankTensor(
                EMBEDDING_RULE.target,
                rank_shape(plan, EMBEDDING_RULE, None, tp),
                EMBEDDING_RULE,
                None,
                tp_rank=tp_rank,
            )
        )
    for local, index in enumerate(stage):
        layer = plan.layers[index]
        for rule in layer_rules(layer):
            shape = rank_shape(plan, rule, layer, tp)
            out.append(RankTensor(rule.target_name(local), shape, rule, layer, local, tp_rank))
    if pp_rank == pp - 1:
        for rule in (FINAL_NORM_RULE, lm_head_rule(plan)):
            shape = rank_shape(plan, rule, None, tp)
            out.append(RankTensor(rule.target, shape, rule, None, tp_rank=tp_rank))
    return out


# ---- FP8 (per-tensor) companions ---------------------------------------------------------------
# A quantized linear `<lin>.weight` carries two float32 [1] scales; a quantized KV cache adds one
# per attention layer. Names as TensorRT-LLM's loader expects them (trtllm-checkpoint.md §5).
def linear_module(weight_name: str) -> str:
    """`<module>.weight` -> `<module>` (what exclude_modules matches)."""
    return weight_name.removesuffix(f".{WEIGHT}")


def scale_names(weight_name: str) -> tuple[str, str]:
    """(weights_scaling_factor, activation_scaling_factor) names of a linear weight."""
    module = linear_module(weight_name)
    return f"{module}.{WEIGHTS_SCALE}", f"{module}.{ACTIVATION_SCALE}"


def per_channel_scale_name(weight_name: str) -> str:
    """TensorRT-LLM's per-channel FP8 weight scale of a linear weight (fp32 [out])."""
    return f"{linear_module(weight_name)}.{PER_CHANNEL_SCALE}"


def kv_cache_scale_name(local_index: int) -> str:
    return f"{_TRT_ATTENTION.format(j=local_index)}.{KV_CACHE_SCALE}"


# TensorRT-LLM's default exclude list (module patterns), used when a quantization dict gives
# none: its lm_head and embedding patterns plus modules this model does not have.
TRTLLM_DEFAULT_FP8_EXCLUDES = (
    f"*{ROLES[Role.LM_HEAD].trtllm}",
    "*router",
    f"*{ROLES[Role.EMBEDDING].trtllm.rsplit('.', 1)[-1]}",
    "*position_embedding",
    "*block_embedding",
    "*shared_expert_gate",
    "*fused_a",
)


def trtllm_fp8_excludes() -> list[str]:
    """`exclude_modules` of the FP8 checkpoints this tool writes: lm_head stays unquantized."""
    return [ROLES[Role.LM_HEAD].trtllm]


def hf_fp8_excludes() -> list[str]:
    """The unified HF checkpoint's `exclude_modules`: lm_head and the embedding."""
    return [ROLES[Role.LM_HEAD].hf, ROLES[Role.EMBEDDING].hf]
