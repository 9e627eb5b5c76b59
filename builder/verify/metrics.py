"""Accuracy metrics of an artifact against the BF16 golden: pure functions on tensors.

This is the one implementation: `builder verify` and `builder.verify.fp8_accuracy` both use it.

Conventions (positions, log-probs):
- A sequence of L token ids has L - 1 scored positions; position j is the distribution of the
  next token after ids[0..j], and its "target" is ids[j + 1].
- Log-probs are natural-log, float64 inside the metrics.

KL(golden || artifact) over the shared top-k, with the tail mass handled explicitly: at each
position the vocabulary is partitioned into the golden's top-k ids that the artifact's answer
covers (all of them for runtimes that return the full distribution; the intersection with the
artifact's own top-k for servers that return only their top-k) plus one "other" bucket holding
the rest. Both distributions are restricted to that partition: p_other = 1 - sum(p_i) and
q_other = 1 - sum(q_i) over the same ids, and KL = sum_i p_i log(p_i / q_i) + p_other
log(p_other / q_other). This is the KL of the two coarsened distributions, so it never exceeds
the full-vocabulary KL (data-processing inequality), it is exact when the tail is in one bucket
on both sides, and it needs nothing but k log-probs per position from either side. q is floored
at Q_FLOOR so that an artifact giving zero probability to a golden top-k token scores a large
finite KL rather than infinity.

Percentiles use the nearest-rank method without interpolation, `sorted[min(n - 1, int(n * q))]`
(trtllm-bench's), named in every report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from builder.report.records import Better

TOP_K = 20
Q_FLOOR = 1e-12
PERCENTILE_METHOD = "nearest rank, sorted[min(n-1, int(n*q))], no interpolation"


@dataclass(frozen=True)
class MetricInfo:
    unit: str
    definition: str
    better: Better

    def __post_init__(self) -> None:
        object.__setattr__(self, "better", Better(self.better))


METRICS: dict[str, MetricInfo] = {
    "kl_mean": MetricInfo(
        "nats",
        "mean over positions of KL(golden || artifact) over the golden top-k ids plus one "
        "'other' bucket (tail mass 1 - sum of the top-k on each side)",
        "lower",
    ),
    "kl_p99": MetricInfo(
        "nats", f"99th percentile over positions of the same KL ({PERCENTILE_METHOD})", "lower"
    ),
    "top1_agreement": MetricInfo(
        "fraction",
        "share of positions where the artifact's most likely token is the golden's",
        "higher",
    ),
    "greedy_exact_match": MetricInfo(
        "fraction",
        "share of prompts whose greedy continuation equals the golden's token for token",
        "higher",
    ),
    "greedy_prefix_mean": MetricInfo(
        "tokens",
        "mean over prompts of the number of leading greedy tokens equal to the golden's",
        "higher",
    ),
    "greedy_prefix_fraction": MetricInfo(
        "fraction", "greedy_prefix_mean / continuation length", "higher"
    ),
    "perplexity": MetricInfo(
        "ppl", "exp of the mean negative log-prob the artifact gives the actual next token", "lower"
    ),
    "golden_perplexity": MetricInfo("ppl", "the same for the golden", "none"),
    "ppl_ratio": MetricInfo("ratio", "artifact perplexity / golden perplexity", "lower"),
    "task_accuracy": MetricInfo(
        "fraction",
        "share of task answers correct (builder.verify.tasks; reasoning off, greedy)",
        "higher",
    ),
    "golden_task_accuracy": MetricInfo("fraction", "the same for the golden", "none"),
    "task_recovery": MetricInfo(
        "ratio", "task_accuracy / golden_task_accuracy (llm-compressor's recovery)", "higher"
    ),
    "task_accuracy_reasoning_on": MetricInfo(
        "fraction",
        "share of task answers correct with reasoning on, sampled at the card's temperature "
        "0.6 / top_p 0.95 with the golden's seeds (over tasks x samples)",
        "higher",
    ),
    "golden_task_accuracy_reasoning_on": MetricInfo("fraction", "the same for the golden", "none"),
    "task_recovery_reasoning_on": MetricInfo(
        "ratio", "task_accuracy_reasoning_on / golden_task_accuracy_reasoning_on", "higher"
    ),
}


# ---- distributions -------------------------------------------------------------------------------
def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log-softmax over the vocabulary in float32 (float64 stays float64)."""
    return F.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)


def top_k(logprobs: torch.Tensor, k: int = TOP_K) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [.., k] int64, log-probs [.., k]) in descending order."""
    values, ids = torch.topk(logprobs, k, dim=-1)
    return ids, values


def gather(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log-probs at `ids` ([T, k] or [T]) from a full [T, V] log-prob table."""
    if ids.dim() == logprobs.dim() - 1:
        return logprobs.gather(-1, ids[..., None])[..., 0]
    return logprobs.gather(-1, ids)


def align(golden_ids: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """The artifact's log-probs at the golden's top ids ([T, k]); NaN where its answer (its own
    top ids `ids` with `logprobs`) does not cover a golden id."""
    match = golden_ids[:, :, None] == ids[:, None, :]  # [T, kg, ka]
    found = match.any(-1)
    picked = (match.to(logprobs.dtype) * logprobs[:, None, :].nan_to_num(neginf=0.0)).sum(-1)
    return torch.where(found, picked, torch.full_like(picked, float("nan")))


def bucket_kl(golden_lp: torch.Tensor, artifact_lp: torch.Tensor) -> torch.Tensor:
    """Per-position KL(golden || artifact) over the covered top-k ids plus one 'other' bucket.

    `golden_lp` [T, k]: the golden's log-probs of its top-k ids; `artifact_lp` [T, k]: the
    artifact's log-probs of the same ids, NaN where unknown (those ids join the other bucket
    on both sides). See the module docstring.
    """
    known = torch.isfinite(artifact_lp) | (artifact_lp == float("-inf"))
    p = torch.where(known, golden_lp.double().exp(), 0.0)
    q = torch.where(known, artifact_lp.double().nan_to_num(nan=0.0).exp(), 0.0)
    p_other = (1.0 - p.sum(-1)).clamp(min=0.0)
    q_other = (1.0 - q.sum(-1)).clamp(min=0.0)
    terms = torch.where(p > 0, p * (p.clamp(min=1e-300).log() - q.clamp(min=Q_FLOOR).log()), 0.0)
    tail = torch.where(
        p_other > 0,
        p_other * (p_other.clamp(min=1e-300).log() - q_other.clamp(min=Q_FLOOR).log()),
        0.0,
    )
    return (terms.sum(-1) + tail).clamp(min=0.0)


def full_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-position KL(reference || other) over the whole vocabulary, from logits."""
    ref, other = log_probs(reference_logits), log_probs(logits)
    return (ref.exp() * (ref - other)).sum(-1)


def agreement(golden_top1: torch.Tensor, artifact_top1: torch.Tensor) -> torch.Tensor:
    """Per-position bool: the most likely tokens agree."""
    return golden_top1 == artifact_top1


def nll(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position negative log-likelihood of `targets` under a full [T, V] table."""
    return -gather(logprobs, targets)


def perplexity(target_logprobs: Sequence[torch.Tensor]) -> float:
    """exp(mean negative log-prob) over all positions of all sequences."""
    values = torch.cat([t.double().reshape(-1) for t in target_logprobs])
    return math.exp(float(-values.mean()))


def matching_prefix(golden: Sequence[int], artifact: Sequence[int]) -> int:
    """Number of leading tokens that agree."""
    n = 0
    for a, b in zip(golden, artifact, strict=False):
        if a != b:
            break
        n += 1
    return n


def percentile(values: torch.Tensor, q: float) -> float:
    """Nearest-rank percentile (PERCENTILE_METHOD)."""
    ordered = torch.sort(values.double().reshape(-1)).values
    return float(ordered[min(len(ordered) - 1, int(len(ordered) * q))])


# ---- one comparison ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SequenceScore:
    """What is compared per sequence: [T, k] top ids/log-probs, [T] target log-probs, and the
    artifact's log-probs at the golden's top ids ([T, k], NaN where unknown) when it has them."""

    top_ids: torch.Tensor
    top_logprobs: torch.Tensor
    target_logprobs: torch.Tensor
    at_golden_ids: torch.Tensor | None = None


@dataclass
class Comparison:
    """Per-position and per-prompt series; `summary()` reduces them to the metrics."""

    kl: list[torch.Tensor]
    agree: list[torch.Tensor]
    golden_targets: list[torch.Tensor]
    artifact_targets: list[torch.Tensor]
    prefix: list[int]
    continuation: int

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.kl:
            kl = torch.cat(self.kl)
            out["kl_mean"] = float(kl.mean())
            out["kl_p99"] = percentile(kl, 0.99)
        if self.agree:
            out["top1_agreement"] = float(torch.cat(self.agree).double().mean())
        if self.artifact_targets:
            golden, artifact = perplexity(self.golden_targets), perplexity(self.artifact_targets)
            out |= {
                "perplexity": artifact,
                "golden_perplexity": golden,
                "ppl_ratio": artifact / golden,
            }
        if self.prefix and self.continuation:
            out["greedy_exact_match"] = sum(p == self.continuation for p in self.prefix) / len(
                self.prefix
            )
            out["greedy_prefix_mean"] = sum(self.prefix) / len(self.prefix)
            out["greedy_prefix_fraction"] = out["greedy_prefix_mean"] / self.continuation
        return out


def compare_scores(
    golden: SequenceScore, artifact: SequenceScore
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-position KL, per-position top-1 agreement) of one sequence."""
    if golden.top_ids.shape[0] != artifact.top_ids.shape[0]:
        raise ValueError(
            f"{golden.top_ids.shape[0]} golden positions vs {artifact.top_ids.shape[0]}"
        )
    at = artifact.at_golden_ids
    if at is None:
        at = align(golden.top_ids, artifact.top_ids, artifact.top_logprobs)
    kl = bucket_kl(golden.top_logprobs, at)
    return kl, agreement(golden.top_ids[:, 0], artifact.top_ids[:, 0])
