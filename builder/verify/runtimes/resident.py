"""`resident`: a TensorRT-LLM checkpoint through builder.runtime.resident.ResidentRuntime, the
fast runtime (weights loaded onto the device once, a static KV cache; on CUDA decode steps as
CUDA graphs and the Triton kernels). Full logits, so every score metric; no localization (the
executor localizes the same checkpoint)."""

from __future__ import annotations

from pathlib import Path

import torch

from builder.verify.runtimes.base import Capabilities, scores_from_logits
from builder.verify.runtimes.executor import checkpoint_artifact
from builder.verify.sampling import Sampler, Sampling

MAX_SEQ = 4096  # cache positions: the longest golden window or prompt + continuation


class ResidentVerifyRuntime:
    name = "resident"

    def __init__(
        self,
        artifact: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        top_k: int = 20,
        max_seq: int = MAX_SEQ,
    ):
        from builder.runtime.resident import ResidentRuntime

        self.path = Path(artifact)
        self.rt = ResidentRuntime.from_checkpoint(
            self.path, dtype=dtype, device=device, max_batch=1, max_seq=max_seq
        )
        self.plan = self.rt.plan
        self.device, self.top_k = device, top_k
        self.artifact = checkpoint_artifact(self.path, self.rt)
        self.capabilities = Capabilities(
            prompt_scores=True,
            full_distribution=True,
            greedy=True,
            localize=False,
            top_k=top_k,
            notes=(
                f"resident runtime, tp={self.rt.tp} pp={self.rt.pp} on one device, "
                f"{str(dtype).removeprefix('torch.')} compute on {device}",
            ),
        )

    def score(self, ids: torch.Tensor, golden_top_ids: torch.Tensor | None = None):
        logits = self.rt.prefill(ids[None])[0].cpu()
        return scores_from_logits(logits, ids, self.top_k, golden_top_ids)

    @torch.no_grad()
    def generate(
        self, prompt_ids: torch.Tensor, sampling: Sampling, eos_id: int | None = None
    ) -> list[int]:
        """The prompt prefilled once, then one decode step per token, each picked by
        builder.verify.sampling."""
        n = sampling.max_tokens
        if n == 0:
            return []
        sampler = Sampler(sampling)
        out = [sampler(self.rt.prefill(prompt_ids[None])[0, -1].cpu())]
        while len(out) < n and (eos_id is None or out[-1] != eos_id):
            out.append(sampler(self.rt.decode(torch.tensor([out[-1]]))[0].cpu()))
        return out

    def close(self) -> None:
        self.rt.drop_graphs()
