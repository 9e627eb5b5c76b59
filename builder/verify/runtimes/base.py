"""The one small interface every verify runtime implements, and what it allows.

A runtime answers two questions about token ids:
  score(ids, golden_top_ids)  per scored position (position j predicts ids[j + 1]): its own top-k
                              ids and log-probs, the log-prob of the actual next token, and, when
                              it has the whole distribution, its log-probs at the golden's top ids;
  generate(prompt_ids, sampling, eos_id)
                              its continuation under `sampling` (builder.verify.sampling: greedy
                              at temperature 0, else temperature / top_p / seed): up to
                              sampling.max_tokens new tokens, stopping after eos_id (None: EOS not
                              special, exactly max_tokens). Runtimes that run our code pick tokens
                              with builder.verify.sampling.pick_token; servers sample themselves.
`capabilities` says which of these it can answer and therefore which metrics a run reports.
Runtimes that run our own code block by block (executor, hf) also offer `localizer()`, and
`plan` (the artifact's ModelPlan, checked against the golden's model before anything runs).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from builder.verify import metrics
from builder.verify.metrics import SequenceScore
from builder.verify.sampling import Sampling

SCORE_METRICS = (
    "kl_mean",
    "kl_p99",
    "top1_agreement",
    "perplexity",
    "golden_perplexity",
    "ppl_ratio",
)
GREEDY_METRICS = ("greedy_exact_match", "greedy_prefix_mean", "greedy_prefix_fraction")


@dataclass(frozen=True)
class Capabilities:
    prompt_scores: bool  # score() works: log-probs of every prompt position
    full_distribution: bool  # score() also gives log-probs at any requested ids
    greedy: bool
    localize: bool
    top_k: int = metrics.TOP_K
    notes: tuple[str, ...] = ()

    def metrics(self) -> tuple[str, ...]:
        return (SCORE_METRICS if self.prompt_scores else ()) + (
            GREEDY_METRICS if self.greedy else ()
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt_scores": self.prompt_scores,
            "full_distribution": self.full_distribution,
            "greedy": self.greedy,
            "localize": self.localize,
            "top_k": self.top_k,
            "metrics": list(self.metrics()),
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class ArtifactInfo:
    path: str
    kind: str  # trtllm-bf16, trtllm-fp8, hf-fp8, server
    sha256: str
    details: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Runtime(Protocol):
    name: str
    capabilities: Capabilities
    artifact: ArtifactInfo
    device: str

    def score(
        self, ids: torch.Tensor, golden_top_ids: torch.Tensor | None = None
    ) -> SequenceScore: ...

    def generate(
        self, prompt_ids: torch.Tensor, sampling: Sampling, eos_id: int | None = None
    ) -> list[int]: ...

    def close(self) -> None: ...


# ---- helpers for runtimes that produce full logits -----------------------------------------------
def scores_from_logits(
    logits: torch.Tensor, ids: torch.Tensor, k: int, golden_top_ids: torch.Tensor | None
) -> SequenceScore:
    """A SequenceScore from full logits [L, V] of ids [L]."""
    lp = metrics.log_probs(logits[:-1])
    top_ids, top_lp = metrics.top_k(lp, k)
    at = metrics.gather(lp, golden_top_ids.long()) if golden_top_ids is not None else None
    return SequenceScore(top_ids, top_lp, metrics.gather(lp, ids[1:].to(lp.device)), at)


def until_eos(tokens: list[int], n: int, eos_id: int | None) -> list[int]:
    """The first n tokens, cut after the first eos_id (a server's answer to a request)."""
    tokens = list(tokens)[:n]
    if eos_id is not None and eos_id in tokens:
        tokens = tokens[: tokens.index(eos_id) + 1]
    return tokens


def directory_sha256(path: Path) -> str:
    """sha256 of the directory's manifest.json (which hashes every file), else of config.json."""
    for name in ("manifest.json", "config.json"):
        if (path / name).is_file():
            return hashlib.sha256((path / name).read_bytes()).hexdigest()
    return ""


def read_json(path: Path) -> dict[str, Any]:
    from builder.errors import UserError

    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: unreadable ({err})") from None
