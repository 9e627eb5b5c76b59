"""`executor`: a TensorRT-LLM checkpoint (BF16, FP8, W8A16 or a per-layer mix; any tp/pp)
through builder.runtime's PyTorch executor, on the CPU or a GPU. Full logits, so every metric
and localization."""

from __future__ import annotations

from pathlib import Path

import torch

from builder.arch.plan import LayerPlan
from builder.arch.tensors import stage_layers
from builder.verify.runtimes.base import (
    ArtifactInfo,
    Capabilities,
    directory_sha256,
    scores_from_logits,
)
from builder.verify.sampling import Sampler, Sampling

# quant_algo -> artifact kind; per-channel and mixed checkpoints come from builder.quantize.formats
QUANT_KINDS = {
    "FP8": "fp8",
    "FP8_PER_CHANNEL_PER_TOKEN": "fp8-pc-pt",
    "W8A16": "w8a16",
    "MIXED_PRECISION": "mixed",
}


def trtllm_kind(config: dict) -> str:
    algo = (config.get("quantization") or {}).get("quant_algo")
    if algo in QUANT_KINDS:
        return f"trtllm-{QUANT_KINDS[algo]}"
    return f"trtllm-{config.get('dtype', 'bfloat16')}".replace("bfloat16", "bf16")


def checkpoint_artifact(path: Path, runner) -> ArtifactInfo:
    """What a verify record says of a TensorRT-LLM checkpoint run by `runner` (the executor
    or the resident runtime: both carry its config and layout)."""
    return ArtifactInfo(
        str(path.resolve()),
        trtllm_kind(runner.config),
        directory_sha256(path),
        {"tp": runner.tp, "pp": runner.pp, "kv_cache_fp8": runner.kv_cache_fp8},
    )


class ExecutorRuntime:
    name = "executor"

    def __init__(
        self,
        artifact: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        top_k: int = 20,
    ):
        from builder.runtime import TrtllmCheckpointExecutor

        self.path = Path(artifact)
        self.executor = TrtllmCheckpointExecutor(self.path, dtype=dtype, device=device)
        self.plan = self.executor.plan
        self.device, self.top_k = device, top_k
        self.artifact = checkpoint_artifact(self.path, self.executor)
        self.capabilities = Capabilities(
            prompt_scores=True,
            full_distribution=True,
            greedy=True,
            localize=True,
            top_k=top_k,
            notes=(
                (
                    f"PyTorch executor, tp={self.executor.tp} pp={self.executor.pp}, "
                    f"{str(dtype).removeprefix('torch.')} compute on {device}"
                ),
            ),
        )

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.executor(ids.to(self.executor.device)).float().cpu()

    def score(self, ids: torch.Tensor, golden_top_ids: torch.Tensor | None = None):
        return scores_from_logits(self.logits(ids), ids, self.top_k, golden_top_ids)

    @torch.no_grad()
    def generate(
        self, prompt_ids: torch.Tensor, sampling: Sampling, eos_id: int | None = None
    ) -> list[int]:
        """KV-cached: the prompt prefilled once, then one decode step per token, each picked by
        builder.verify.sampling (greedy: the argmax the executor's own `greedy` takes)."""
        n = sampling.max_tokens
        if n == 0:
            return []
        ex, sampler = self.executor, Sampler(sampling)
        cache = ex.new_cache(1, len(prompt_ids) + n)
        logits = ex.prefill(prompt_ids[None].to(ex.device), cache)[0]
        out = [sampler(logits)]
        while len(out) < n and (eos_id is None or out[-1] != eos_id):
            logits = ex.decode_step(torch.tensor([out[-1]]), cache)[0]
            out.append(sampler(logits))
        return out

    def localizer(self) -> ExecutorLocalizer:
        return ExecutorLocalizer(self)

    def close(self) -> None:
        self.executor.close()


class ExecutorLocalizer:
    """The executor's parts run one at a time on golden inputs (see builder.verify.localize)."""

    def __init__(self, runtime: ExecutorRuntime):
        self.runtime = runtime
        self.ex = runtime.executor
        self.plan = self.ex.plan

    def where(self, layer: LayerPlan) -> tuple[int, int]:
        """(pipeline stage, stage-local index) of a layer."""
        for pp_rank in range(self.ex.pp):
            stage = stage_layers(self.plan, self.ex.pp, pp_rank)
            if layer.index in stage:
                return pp_rank, layer.index - stage.start
        raise AssertionError(layer.index)

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.ex.embed(ids.to(self.ex.device))

    @torch.no_grad()
    def block(self, layer: LayerPlan, x: torch.Tensor) -> torch.Tensor:
        pp_rank, local = self.where(layer)
        cos, sin = self.ex.rope_tables(x.shape[0])
        states = x[None].to(self.ex.device, self.ex.dtype)
        return self.ex.layer(states, layer, local, self.ex.stage_ranks(pp_rank), cos, sin)[0]

    @torch.no_grad()
    def logits(self, final: torch.Tensor) -> torch.Tensor:
        states = final[None].to(self.ex.device, self.ex.dtype)
        return self.ex.lm_head(states, self.ex.stage_ranks(self.ex.pp - 1))[0]

    def tensor_findings(self, part: int | str, checks) -> list[str]:
        from builder.verify.localize import trtllm_tensor_findings

        return trtllm_tensor_findings(self.ex, part, checks)

    def integrity(self) -> list[str]:
        from builder.verify.localize import manifest_findings

        return manifest_findings(self.runtime.path)
