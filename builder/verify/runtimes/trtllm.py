"""`trtllm`: TensorRT-LLM's LLM API in-process (PyTorch backend, unified HF FP8 checkpoints).

Imported only when chosen; without tensorrt_llm installed it is a clear error, never a
stand-in. Scores come from `SamplingParams(prompt_logprobs=k)`, greedy continuations from
`SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)`, sampled ones with
`temperature`, `top_p` and `seed`; prompts go as token ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from builder.errors import UserError
from builder.verify.metrics import SequenceScore
from builder.verify.runtimes.base import ArtifactInfo, Capabilities, directory_sha256, until_eos
from builder.verify.sampling import Sampling


def import_llm_api() -> Any:
    try:
        import tensorrt_llm
    except ImportError as err:
        raise UserError(
            f"the trtllm runtime needs TensorRT-LLM ({err}); install it on a GPU host "
            "(pip install 'builder[trtllm]' or NVIDIA's container), or use --runtime "
            "executor/hf/openai"
        ) from None
    return tensorrt_llm


def _logprob(value: Any) -> float:
    return float(getattr(value, "logprob", value))


class TrtllmRuntime:
    name = "trtllm"

    def __init__(self, artifact: str | Path, top_k: int = 20):
        trt = import_llm_api()
        self.path = Path(artifact)
        self.top_k = top_k
        self.sampling = trt.SamplingParams
        self.llm = trt.LLM(model=str(self.path))
        self.device = "cuda"
        self.artifact = ArtifactInfo(
            str(self.path.resolve()),
            "trtllm-llm-api",
            directory_sha256(self.path),
            {"tensorrt_llm": getattr(trt, "__version__", "unknown")},
        )
        self.capabilities = Capabilities(
            prompt_scores=True,
            full_distribution=False,
            greedy=True,
            localize=False,
            top_k=top_k,
            notes=(f"TensorRT-LLM {getattr(trt, '__version__', '?')} LLM API, in-process",),
        )

    def score(self, ids: torch.Tensor, golden_top_ids: torch.Tensor | None = None) -> SequenceScore:
        prompt = [int(t) for t in ids]
        params = self.sampling(max_tokens=1, temperature=0.0, prompt_logprobs=self.top_k)
        entries = self.llm.generate([prompt], params)[0].outputs[0].prompt_logprobs
        offset = len(entries) - (len(prompt) - 1)  # some releases omit position 0's empty entry
        top_ids, top_lp, target = [], [], []
        for position in range(1, len(prompt)):
            entry = entries[position - 1 + offset] or {}
            ranked = sorted(
                ((int(t), _logprob(v)) for t, v in entry.items()), key=lambda tv: -tv[1]
            )[: self.top_k]
            pad = self.top_k - len(ranked)
            top_ids.append([t for t, _ in ranked] + [-1] * pad)
            top_lp.append([v for _, v in ranked] + [float("nan")] * pad)
            actual = entry.get(prompt[position])
            target.append(_logprob(actual) if actual is not None else float("nan"))
        return SequenceScore(
            torch.tensor(top_ids),
            torch.tensor(top_lp, dtype=torch.float64),
            torch.tensor(target, dtype=torch.float64),
        )

    def generate(
        self, prompt_ids: torch.Tensor, sampling: Sampling, eos_id: int | None = None
    ) -> list[int]:
        n = sampling.max_tokens
        if n == 0:
            return []
        options: dict[str, Any] = {"max_tokens": n, "ignore_eos": eos_id is None}
        if sampling.is_greedy:
            options["temperature"] = 0.0
        else:
            options |= {
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "seed": sampling.seed,
            }
        answer = self.llm.generate([[int(t) for t in prompt_ids]], self.sampling(**options))
        return until_eos(answer[0].outputs[0].token_ids, n, eos_id)

    def close(self) -> None:
        shutdown = getattr(getattr(self, "llm", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
