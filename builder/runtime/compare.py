"""Comparing the executor's logits with the native reference model's, on a prompt."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from builder.runtime.executor import TrtllmCheckpointExecutor

DEFAULT_PROMPT = "The capital of France is"


@dataclass(frozen=True)
class Comparison:
    """Logit agreement: relative_error = max |a - b| / max |b| over all positions and tokens."""

    max_abs_error: float
    relative_error: float
    reference_max_abs: float
    tokens: int
    argmax_agreement: float  # fraction of positions whose top token matches
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def compare_logits(
    actual: torch.Tensor, reference: torch.Tensor, dtype: str = "float32"
) -> Comparison:
    actual, reference = actual.float(), reference.float()
    if actual.shape != reference.shape:
        raise ValueError(f"logit shapes differ: {tuple(actual.shape)} vs {tuple(reference.shape)}")
    diff = (actual - reference).abs().max().item()
    scale = reference.abs().max().item()
    agree = (actual.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return Comparison(
        diff, diff / scale if scale else diff, scale, reference.shape[-2], agree, dtype
    )


def prompt_ids(hf_dir: str | Path, prompt: str) -> torch.Tensor:
    """Token ids of `prompt` with the checkpoint's own tokenizer (local files only)."""
    from transformers import AutoTokenizer

    import builder.model  # noqa: F401  (registers nemotron-nas, whose config AutoTokenizer reads)

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    return torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])


def reference_logits(
    hf_dir: str | Path, input_ids: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    from builder.model import load_reference_model

    model = load_reference_model(hf_dir, dtype=dtype)
    with torch.no_grad():
        return model(input_ids).logits.float()


def compare_with_reference(
    trtllm_dir: str | Path,
    hf_dir: str | Path,
    prompt: str = DEFAULT_PROMPT,
    input_ids: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> Comparison:
    """Run the TensorRT-LLM checkpoint with the executor and the HF checkpoint with the
    reference model on the same tokens (`input_ids`, else `prompt` tokenized); compare logits.
    """
    ids = input_ids if input_ids is not None else prompt_ids(hf_dir, prompt)
    ids = ids[None] if ids.dim() == 1 else ids
    with TrtllmCheckpointExecutor(trtllm_dir, dtype=dtype) as executor:
        actual = executor(ids)
    return compare_logits(
        actual, reference_logits(hf_dir, ids, dtype), str(dtype).removeprefix("torch.")
    )
