"""Memory, KV-cache, disk and time plan of a model plan on a target profile.

Every size comes from builder.arch: per-rank tensors and shapes from `rank_tensors` /
`rank_shape` (the table convert writes from), KV bytes from `ModelPlan.kv_bytes_per_token`
on the layers a pipeline stage holds, parameters from `ModelPlan.layer_params`. Nothing
here re-derives a shape.

What is exact and what is estimated:
- exact: weight bytes per rank (BF16, or FP8 linears at 1 byte plus two fp32 scales each,
  lm_head / embedding / norms BF16), KV bytes per token per rank, tensor counts;
- estimated (stated in the output): activations, the runtime reserve, host RAM and the
  time lower bounds.

Formulas (also written into every report under `formulas`):
- activations per rank = max_num_tokens x (2 h + max over the stage's layers of the summed
  per-rank widths of its linear outputs / row-parallel inputs) x 2 B, plus
  max_batch_size x vocab x 4 B of fp32 logits on the last stage. TensorRT reuses
  activation buffers across layers, so the widest layer sets the peak (MLP: fc + gate +
  SwiGLU product = 3 I / tp). trtllm-build prints the real figure; replace the estimate.
- free = GPU memory - weights - activations - runtime reserve; KV pool = fraction x free
  (TensorRT-LLM's kv_cache_free_gpu_mem_fraction is a fraction of what is free after the
  engine is loaded); KV tokens = pool / KV bytes per token, rounded down to whole blocks.
- decode step >= bytes read per GPU / HBM bandwidth, bytes read = the rank's weights less
  its embedding (rows are gathered, not streamed) plus the KV of the active sequences
  (NVIDIA datasheets); pipeline stages add up.
- convert host RAM ~ 1 GiB + 2 x the largest per-rank tensor (streamed: one tensor read,
  one written); quantize host RAM ~ 1 GiB + the largest HF block (BF16) + 2 x the
  calibration activations (a block's inputs and outputs, calib tokens x h x 2 B);
  trtllm-build host RAM ~ workers x 2 x a rank's weights (checkpoint tensors plus the
  network's copy). Times are I/O lower bounds (bytes / disk rate) plus, for calibration,
  2 x linear params x calib tokens / one GPU's BF16 peak.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from builder.arch import AttentionKind, ModelPlan, parallelism_problems, rank_tensors, stage_layers
from builder.arch.tensors import (
    EMBEDDING_RULE,
    RankTensor,
    Split,
    TensorRule,
    layer_rules,
    rank_shape,
)
from builder.deploy.profiles import TargetProfile

GIB = 1 << 30
BF16 = 2
FP32 = 4
SCALES_PER_FP8_LINEAR = 2  # weights_scaling_factor and activation_scaling_factor, fp32 [1]
RUNTIME_HOST_OVERHEAD = 1 * GIB  # Python, torch, safetensors headers: the "~1 GiB" term
PARALLEL_EMBEDDING_RULE = TensorRule(EMBEDDING_RULE.target, EMBEDDING_RULE.sources, Split.VOCAB)

FORMULAS = {
    "weights": "sum over the rank's tensors (builder.arch.rank_tensors): BF16 2 B/elem; FP8 "
    "linears 1 B/elem + 2 fp32 scales; FP8 KV adds one fp32 kv scale per attention layer",
    "activations": "max_num_tokens x (2 h + widest layer's per-rank linear widths) x 2 B "
    "+ last stage: max_batch_size x vocab x 4 B logits (estimate)",
    "kv_pool": "kv_cache_free_gpu_mem_fraction x (GPU memory - weights - activations - reserve)",
    "kv_tokens": "floor(kv_pool / KV bytes per token per rank / tokens_per_block)"
    " x tokens_per_block",
    "sequences": "kv_tokens // (ceil((isl + osl) / tokens_per_block) x tokens_per_block)",
    "decode_step": "sum over stages of max rank (weights - embedding + active KV) / HBM bandwidth "
    "(lower bound, datasheet bandwidth)",
    "convert_ram": "1 GiB + 2 x largest per-rank BF16 tensor: an upper bound (plain convert "
    "streams 64 MiB blocks; a rank transform such as FP8 holds one whole rank tensor)",
    "quantize_ram": "1 GiB + largest HF block in BF16"
    " + 2 x calib_samples x calib_seq_len x h x 2 B",
    "build_ram": "workers x 2 x largest rank's weights (estimate)",
    "times": "I/O lower bounds: bytes read / disk_read_gbs + bytes written / disk_write_gbs; "
    "calibration adds 2 x linear params x calib tokens / bf16_tflops (one GPU)",
}


# ---- weights ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RankWeights:
    """What one rank file holds, in bytes, at the target precision."""

    rank: int
    tensors: int
    total: int
    embedding: int
    largest_tensor: int


def _tensor_shape(plan: ModelPlan, tensor: RankTensor, tp: int, parallel_embedding: bool) -> tuple:
    if parallel_embedding and tensor.rule is EMBEDDING_RULE:
        return rank_shape(plan, PARALLEL_EMBEDDING_RULE, None, tp)
    return tensor.shape


def rank_weights(
    plan: ModelPlan,
    profile: TargetProfile,
    rank: int,
    fp8: bool | None = None,
    kv_fp8: bool | None = None,
) -> RankWeights:
    """Bytes of rank{rank}.safetensors at the profile's precision; `fp8` / `kv_fp8` override
    the weight and KV-cache precision (e.g. both False: the BF16 checkpoint convert writes)."""
    tp, pp = profile.parallel.tp, profile.parallel.pp
    fp8 = profile.fp8_weights if fp8 is None else fp8
    kv_fp8 = profile.precision.kv_cache == "fp8" if kv_fp8 is None else kv_fp8
    count = total = embedding = largest = 0
    attention_layers = set()
    for tensor in rank_tensors(plan, tp, pp, rank):
        numel = math.prod(_tensor_shape(plan, tensor, tp, profile.precision.use_parallel_embedding))
        size = numel * BF16
        count += 1
        if fp8 and tensor.rule.linear:
            size = numel + SCALES_PER_FP8_LINEAR * FP32
            count += SCALES_PER_FP8_LINEAR
        if tensor.rule is EMBEDDING_RULE:
            embedding = size
        if tensor.layer is not None and tensor.layer.attention is AttentionKind.ATTENTION:
            attention_layers.add(tensor.layer.index)
        total += size
        largest = max(largest, size)
    if kv_fp8:
        total += len(attention_layers) * FP32  # kv_cache_scaling_factor
        count += len(attention_layers)
    return RankWeights(rank, count, total, embedding, largest)


# ---- stages, KV and activations -----------------------------------------------------------------
def stage_plan(plan: ModelPlan, pp: int, pp_rank: int) -> ModelPlan:
    """The plan restricted to one pipeline stage's layers (global indices kept)."""
    layers = tuple(plan.layers[i] for i in stage_layers(plan, pp, pp_rank))
    return dataclasses.replace(plan, layers=layers)


def layer_activation_width(plan: ModelPlan, layer, tp: int) -> int:
    """Per-token elements a layer's linears produce on one rank (column: outputs, row: inputs)."""
    width = 0
    for rule in layer_rules(layer):
        if not rule.linear:
            continue
        shape = rank_shape(plan, rule, layer, tp)
        width += shape[1] if rule.split is Split.ROW else shape[0]
    return width


def activation_bytes(plan: ModelPlan, profile: TargetProfile, pp_rank: int) -> int:
    stage = stage_plan(plan, profile.parallel.pp, pp_rank)
    tp = profile.parallel.tp
    widest = max((layer_activation_width(plan, layer, tp) for layer in stage.layers), default=0)
    per_token = 2 * plan.hidden_size + widest
    total = profile.build.max_num_tokens * per_token * BF16
    if pp_rank == profile.parallel.pp - 1:
        total += profile.build.max_batch_size * plan.vocab_size * FP32
    return total


def _blocks(tokens: int, block: int) -> int:
    return math.ceil(tokens / block) * block


@dataclass(frozen=True)
class RankMemory:
    rank: int
    pp_rank: int
    tensors: int
    weights: int
    embedding: int
    activations: int
    reserve: int
    free: int
    kv_bytes_per_token: int
    kv_pool: int
    kv_tokens: int | None  # None: the stage holds no attention layer

    @property
    def used_before_kv(self) -> int:
        return self.weights + self.activations + self.reserve


def rank_memory(plan: ModelPlan, profile: TargetProfile, rank: int) -> RankMemory:
    tp, pp = profile.parallel.tp, profile.parallel.pp
    pp_rank = rank // tp
    weights = rank_weights(plan, profile, rank)
    activations = activation_bytes(plan, profile, pp_rank)
    reserve = int(profile.runtime.runtime_reserve_gib * GIB)
    free = int(profile.hardware.gpu_memory_gib * GIB) - weights.total - activations - reserve
    kv_per_token = stage_plan(plan, pp, pp_rank).kv_bytes_per_token(profile.kv_dtype, tp)
    pool = int(profile.runtime.kv_cache_free_gpu_mem_fraction * max(free, 0))
    tokens = None
    if kv_per_token:
        block = profile.build.tokens_per_block
        tokens = pool // kv_per_token // block * block
    return RankMemory(
        rank,
        pp_rank,
        weights.tensors,
        weights.total,
        weights.embedding,
        activations,
        reserve,
        free,
        kv_per_token,
        pool,
        tokens,
    )


# ---- pipeline balance
# -------------------------------------------------------------------------------
def stage_params(plan: ModelPlan, boundaries: list[int]) -> list[dict[str, int]]:
    """Per-stage parameters for stages starting at `boundaries` (first stage: embedding,
    last stage: final norm and lm_head)."""
    edges = [*boundaries, plan.num_layers]
    stages = []
    for s in range(len(boundaries)):
        layers = range(edges[s], edges[s + 1])
        layer_params = sum(plan.layer_params(plan.layers[i]).total for i in layers)
        extra = plan.embedding_params if s == 0 else 0
        if s == len(boundaries) - 1:
            extra += plan.lm_head_params + plan.hidden_size
        stages.append(
            {
                "first_layer": edges[s],
                "layers": len(layers),
                "attention_layers": sum(
                    plan.layers[i].attention is AttentionKind.ATTENTION for i in layers
                ),
                "layer_params": layer_params,
                "params": layer_params + extra,
            }
        )
    return stages


def balanced_partition(plan: ModelPlan, pp: int) -> list[int]:
    """Contiguous layer counts per stage minimising the largest stage's parameters
    (embedding on the first stage, lm_head on the last). Exact DP, O(pp x L^2)."""
    n = plan.num_layers
    if not 1 <= pp <= n:
        raise ValueError(f"pp {pp} must be between 1 and the {n} layers")
    prefix = [0]
    for layer in plan.layers:
        prefix.append(prefix[-1] + plan.layer_params(layer).total)
    head = plan.lm_head_params + plan.hidden_size

    def cost(start: int, end: int, stage: int) -> int:
        extra = (plan.embedding_params if stage == 0 else 0) + (head if stage == pp - 1 else 0)
        return prefix[end] - prefix[start] + extra

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(pp + 1)]
    cut = [[0] * (n + 1) for _ in range(pp + 1)]
    best[0][0] = 0
    for s in range(1, pp + 1):
        for end in range(s, n - (pp - s) + 1):
            for start in range(s - 1, end):
                value = max(best[s - 1][start], cost(start, end, s - 1))
                if value < best[s][end]:
                    best[s][end], cut[s][end] = value, start
    counts, end = [], n
    for s in range(pp, 0, -1):
        start = cut[s][end]
        counts.append(end - start)
        end = start
    return counts[::-1]


def pp_balance(plan: ModelPlan, pp: int) -> dict[str, Any]:
    """Equal-layer-count stages (what TensorRT-LLM checkpoints use) vs the balanced suggestion."""
    result: dict[str, Any] = {"pp": pp, "divides_layers": plan.num_layers % pp == 0}
    if result["divides_layers"]:
        per = plan.num_layers // pp
        result["equal_layers"] = stage_params(plan, [s * per for s in range(pp)])
    counts = balanced_partition(plan, pp)
    starts = [sum(counts[:s]) for s in range(pp)]
    result["suggested_pp_partition"] = counts
    result["suggested"] = stage_params(plan, starts)
    result["note"] = (
        "TensorRT-LLM checkpoints split layers in equal counts; the suggested partition is for "
        "runtimes that accept an explicit pp_partition (LLM API / PyTorch backend)."
    )
    return result


# ---- parallelism checks
# ----------------------------------------------------------------------------
def tp_checks(plan: ModelPlan, tp: int, pp: int) -> dict[str, Any]:
    attention = plan.attention_layers
    mlp_widths = sorted({layer.ffn_width for layer in plan.layers if layer.ffn_width})
    duplicated = [layer.index for layer in attention if tp > layer.kv_heads]
    block_fp8_misaligned = sorted({w for w in mlp_widths if w % tp == 0 and (w // tp) % 128})
    return {
        "problems": parallelism_problems(plan, tp, pp),
        "query_heads_per_rank": plan.num_attention_heads / tp,
        "kv_heads_per_rank": sorted({math.ceil(layer.kv_heads / tp) for layer in attention}),
        "layers_with_duplicated_kv_heads": duplicated,
        "ffn_width_per_rank": [w // tp for w in mlp_widths if w % tp == 0],
        "ffn_widths_not_128_aligned_per_rank": block_fp8_misaligned,
        "note": "128x128 block FP8 would need every I/tp to be a multiple of 128; builder's "
        "per-tensor FP8 does not, so misaligned widths are informational.",
    }


# ---- decode bound -------------------------------------------------------------------------------
def decode_bound(
    profile: TargetProfile, memories: list[RankMemory], concurrency: int, context: int
) -> dict[str, Any]:
    bandwidth = profile.hardware.hbm_bandwidth_tbs * 1e12
    stages: dict[int, list[RankMemory]] = {}
    for memory in memories:
        stages.setdefault(memory.pp_rank, []).append(memory)
    weights_read = [max(m.weights - m.embedding for m in ranks) for ranks in stages.values()]
    kv_read = [
        max(m.kv_bytes_per_token for m in ranks) * concurrency * context
        for ranks in stages.values()
    ]
    step_1 = sum(w / bandwidth for w in weights_read)
    step_c = sum((w + k) / bandwidth for w, k in zip(weights_read, kv_read, strict=True))
    return {
        "bytes_read_per_gpu_per_step": max(weights_read),
        "step_ms_batch1": step_1 * 1e3,
        "tokens_per_s_per_sequence": 1 / step_1,
        "concurrency": concurrency,
        "context_tokens": context,
        "step_ms_at_concurrency": step_c * 1e3,
        "tokens_per_s_aggregate": concurrency / step_c if concurrency else 0.0,
        "basis": "HBM datasheet bandwidth; measured rates are ~70-85% of it"
        " (an H200 copies at 87%)",
    }


# ---- host side: disk, RAM, time ------------------------------------------------------------------
def _hf_linear_names(plan: ModelPlan) -> list[str]:
    names = []
    for layer in plan.layers:
        for rule in layer_rules(layer):
            if rule.linear:
                names.extend(rule.source_names(layer.index))
    return names


def _io_seconds(profile: TargetProfile, read: int, written: int) -> float:
    h = profile.hardware
    return read / (h.disk_read_gbs * 1e9) + written / (h.disk_write_gbs * 1e9)


def host_plan(plan: ModelPlan, profile: TargetProfile) -> dict[str, Any]:
    world = profile.world_size
    bf16_ranks = [rank_weights(plan, profile, r, fp8=False, kv_fp8=False) for r in range(world)]
    fp8_ranks = [rank_weights(plan, profile, r, fp8=True) for r in range(world)]
    target_ranks = fp8_ranks if profile.fp8_weights else bf16_ranks
    hf_bytes = plan.total_bytes("bfloat16")
    bf16_ckpt = sum(r.total for r in bf16_ranks)
    fp8_ckpt = sum(r.total for r in fp8_ranks)
    linear_tensors = len(_hf_linear_names(plan))
    kv_scales = 2 * len(plan.attention_layers) if profile.precision.kv_cache == "fp8" else 0
    hf_fp8 = plan.fp8_bytes() + (SCALES_PER_FP8_LINEAR * linear_tensors + kv_scales) * FP32
    calib_tokens = profile.quantize.calib_samples * profile.quantize.calib_seq_len
    calib_cache = calib_tokens * plan.hidden_size * BF16
    largest_block = max(plan.layer_params(layer).total for layer in plan.layers) * BF16
    calib_flops = 2 * plan.linear_params * calib_tokens
    engines = sum(r.total for r in target_ranks)
    build_ram = profile.engine_workers * 2 * max(r.total for r in target_ranks)
    steps = {
        "convert": {
            "reads": hf_bytes,
            "disk_written": bf16_ckpt,
            "host_ram": RUNTIME_HOST_OVERHEAD + 2 * max(r.largest_tensor for r in bf16_ranks),
            "seconds_lower_bound": _io_seconds(profile, hf_bytes, bf16_ckpt),
            "output": (
                f"BF16 TensorRT-LLM checkpoint, tp={profile.parallel.tp} pp={profile.parallel.pp}"
            ),
        },
        "quantize": {
            "reads": hf_bytes,
            "disk_written": fp8_ckpt + hf_fp8 + calib_cache,
            "fp8_trtllm_checkpoint": fp8_ckpt,
            "fp8_hf_checkpoint": hf_fp8,
            "calibration_cache": calib_cache,
            "calibration_tokens": calib_tokens,
            "host_ram": RUNTIME_HOST_OVERHEAD + largest_block + 2 * calib_cache,
            "gpu_memory_one_block": largest_block + 2 * calib_cache,
            "seconds_lower_bound": _io_seconds(profile, hf_bytes, fp8_ckpt + hf_fp8)
            + calib_flops / (profile.hardware.bf16_tflops * 1e12),
            "output": "FP8 TensorRT-LLM checkpoint + unified HF FP8 checkpoint",
        },
        "build": {
            "reads": engines,
            "disk_written": engines,
            "host_ram": build_ram,
            "seconds_lower_bound": _io_seconds(profile, engines, engines),
            "output": f"{world} engine files (TensorRT compile time not included: measure it)",
        },
    }
    for step in steps.values():
        step["fits_host_ram"] = step["host_ram"] <= profile.hardware.host_memory_gib * GIB
    return {
        "hf_checkpoint_bytes": hf_bytes,
        "steps": steps,
        "disk_total_pipeline": hf_bytes + bf16_ckpt + fp8_ckpt + hf_fp8 + calib_cache + engines,
    }


# ---- the whole plan
# -----------------------------------------------------------------------------------
@dataclass
class TargetPlan:
    """The plan of one model on one target: data (`to_dict`) and a verdict."""

    model: ModelPlan
    profile: TargetProfile
    ranks: list[RankMemory]
    kv_tokens: int | None
    sequences_fit: int | None
    concurrency: int
    decode: dict[str, Any]
    tp: dict[str, Any]
    pipeline: dict[str, Any]
    host: dict[str, Any]
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def verdict(self) -> str:
        if self.problems:
            return "does not fit: " + "; ".join(self.problems)
        worst = max(self.ranks, key=lambda m: m.used_before_kv)
        kv = (
            "no KV cache needed"
            if self.kv_tokens is None
            else (
                f"{self.kv_tokens:,} KV tokens per rank, {self.concurrency} concurrent "
                f"{self.profile.runtime.isl}+{self.profile.runtime.osl}-token sequences"
            )
        )
        return (
            f"fits: {worst.weights / GIB:.1f} GiB weights + {worst.activations / GIB:.1f} GiB "
            f"activations + {worst.reserve / GIB:.1f} GiB reserve of "
            f"{self.profile.hardware.gpu_memory_gib:.1f} GiB leave {worst.free / GIB:.1f} GiB; {kv}"
        )

    def to_dict(self) -> dict[str, Any]:
        p, m = self.profile, self.model
        worst = max(self.ranks, key=lambda r: r.used_before_kv) if self.ranks else None
        return {
            "model": {
                "source": m.source,
                "params": m.total_params,
                "layers": m.num_layers,
                "attention_layers": len(m.attention_layers),
                "kv_bytes_per_token_total": m.kv_bytes_per_token(p.kv_dtype),
            },
            "target": p.to_json(),
            "fits": self.fits,
            "verdict": self.verdict,
            "problems": self.problems,
            "warnings": self.warnings,
            "per_rank": [dataclasses.asdict(r) for r in self.ranks],
            "worst_rank": worst.rank if worst else None,
            "weights_per_rank_max": max((r.weights for r in self.ranks), default=None),
            "kv_bytes_per_token_per_rank": max(
                (r.kv_bytes_per_token for r in self.ranks), default=None
            ),
            "kv_tokens_per_rank": self.kv_tokens,
            "sequences_fit": self.sequences_fit,
            "concurrency": self.concurrency,
            "decode": self.decode,
            "tp_checks": self.tp,
            "pipeline": self.pipeline,
            "host": self.host,
            "formulas": FORMULAS,
        }


def _memory_problems(profile: TargetProfile, ranks: list[RankMemory]) -> list[str]:
    problems = []
    gpu = profile.hardware.gpu_memory_gib
    worst = max(ranks, key=lambda m: m.used_before_kv)
    if worst.free <= 0:
        problems.append(
            f"rank {worst.rank} needs {worst.weights / GIB:.1f} GiB weights + "
            f"{worst.activations / GIB:.1f} GiB activations + {worst.reserve / GIB:.1f} GiB "
            "reserve "
            f"= {worst.used_before_kv / GIB:.1f} GiB > {gpu:.1f} GiB per GPU"
        )
        return problems
    kv_ranks = [m for m in ranks if m.kv_tokens is not None]
    if kv_ranks:
        tight = min(kv_ranks, key=lambda m: m.kv_tokens)
        need = _blocks(profile.build.max_seq_len, profile.build.tokens_per_block)
        if tight.kv_tokens < need:
            problems.append(
                f"rank {tight.rank}'s KV pool holds {tight.kv_tokens:,} tokens, fewer than one "
                f"max_seq_len={profile.build.max_seq_len} sequence"
            )
    return problems


def _workload_warnings(profile: TargetProfile, plan: TargetPlan) -> list[str]:
    b, r = profile.build, profile.runtime
    notes = []
    if r.isl + r.osl > b.max_seq_len:
        notes.append(
            f"workload isl+osl = {r.isl + r.osl} exceeds build.max_seq_len {b.max_seq_len}"
        )
    if r.isl > b.max_input_len:
        notes.append(f"workload isl {r.isl} exceeds build.max_input_len {b.max_input_len}")
    if b.max_input_len > b.max_num_tokens and not r.enable_chunked_prefill:
        notes.append(
            f"build.max_input_len {b.max_input_len} > build.max_num_tokens {b.max_num_tokens}: "
            "long prompts need runtime.enable_chunked_prefill = true"
        )
    if plan.sequences_fit is not None and plan.sequences_fit < b.max_batch_size:
        notes.append(
            f"the KV cache holds {plan.sequences_fit} sequences of {r.isl}+{r.osl} tokens, "
            f"fewer than build.max_batch_size {b.max_batch_size}"
        )
    for name, step in plan.host["steps"].items():
        if not step["fits_host_ram"]:
            notes.append(
                f"{name} needs ~{step['host_ram'] / GIB:.0f} GiB host RAM, more than "
                f"hardware.host_memory_gib {profile.hardware.host_memory_gib:.0f}"
            )
    duplicated = plan.tp["layers_with_duplicated_kv_heads"]
    if duplicated:
        notes.append(
            f"tp {profile.parallel.tp} exceeds the KV heads of {len(duplicated)} layers: their KV "
            "heads are duplicated (per-rank KV stays one head)"
        )
    return notes


def plan_target(plan: ModelPlan, profile: TargetProfile) -> TargetPlan:
    """The full plan of `plan` on `profile` (raises nothing for an impossible layout: it
    becomes a problem in the verdict)."""
    tp, pp = profile.parallel.tp, profile.parallel.pp
    layout = parallelism_problems(plan, tp, pp)
    if layout:
        return _impossible(plan, profile, layout)
    ranks = [rank_memory(plan, profile, r) for r in range(profile.world_size)]
    kv_tokens = min((m.kv_tokens for m in ranks if m.kv_tokens is not None), default=None)
    r = profile.runtime
    per_sequence = _blocks(r.isl + r.osl, profile.build.tokens_per_block)
    sequences = None if kv_tokens is None else kv_tokens // per_sequence
    concurrency = (
        profile.build.max_batch_size
        if sequences is None
        else min(sequences, profile.build.max_batch_size)
    )
    context = r.isl + r.osl // 2
    result = TargetPlan(
        model=plan,
        profile=profile,
        ranks=ranks,
        kv_tokens=kv_tokens,
        sequences_fit=sequences,
        concurrency=concurrency,
        decode=decode_bound(profile, ranks, concurrency, context),
        tp=tp_checks(plan, tp, pp),
        pipeline=pp_balance(plan, pp),
        host=host_plan(plan, profile),
    )
    result.problems = _memory_problems(profile, ranks)
    result.warnings = _workload_warnings(profile, result)
    return result


def _impossible(plan: ModelPlan, profile: TargetProfile, layout: list[str]) -> TargetPlan:
    tp, pp = profile.parallel.tp, profile.parallel.pp
    more = f" (and {len(layout) - 1} more)" if len(layout) > 1 else ""
    pipeline = pp_balance(plan, pp) if pp <= plan.num_layers else {"pp": pp}
    return TargetPlan(
        model=plan,
        profile=profile,
        ranks=[],
        kv_tokens=None,
        sequences_fit=None,
        concurrency=0,
        decode={},
        tp={"problems": layout},
        pipeline=pipeline,
        host={},
        problems=[f"cannot split tp={tp} pp={pp}: {layout[0]}{more}"],
    )
