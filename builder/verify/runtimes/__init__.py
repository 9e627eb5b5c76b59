"""Verify runtimes by name, imported only when chosen (each behind builder.verify.runtimes.base).

executor  TensorRT-LLM checkpoint through builder.runtime's PyTorch executor (CPU or CUDA)
resident  the same through builder.runtime.resident.ResidentRuntime (weights on the device)
hf        unified HF FP8 export through builder's reference model (dequantized, streamed)
openai    a live OpenAI-compatible server (/v1/completions): trtllm-serve, vLLM, SGLang
triton    a Triton generate endpoint (/v2/models/<model>/generate) with return_log_probs
trtllm    TensorRT-LLM's LLM API in-process (optional extra; an error when not installed)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from builder.errors import UserError

RUNTIMES = {
    "executor": "builder.verify.runtimes.executor:ExecutorRuntime",
    "resident": "builder.verify.runtimes.resident:ResidentVerifyRuntime",
    "hf": "builder.verify.runtimes.hf:HfFp8Runtime",
    "openai": "builder.verify.runtimes.openai:OpenAIRuntime",
    "triton": "builder.verify.runtimes.triton:TritonRuntime",
    "trtllm": "builder.verify.runtimes.trtllm:TrtllmRuntime",
}
SERVER_RUNTIMES = ("openai", "triton")


@dataclass(frozen=True)
class RuntimeArgs:
    """What `builder verify` passes to a runtime (each takes the fields it needs)."""

    artifact: str | None = None
    url: str | None = None
    model: str | None = None
    dtype: Any = None
    device: str = "cpu"
    top_k: int = 20
    tokenizer: Any = None
    timeout: float = 300.0


def runtime_class(name: str) -> type:
    if name not in RUNTIMES:
        raise UserError(f"unknown runtime {name!r}; choose one of {', '.join(RUNTIMES)}")
    module, cls = RUNTIMES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_runtime(name: str, args: RuntimeArgs) -> Any:
    cls = runtime_class(name)
    if name in SERVER_RUNTIMES:
        if not args.url:
            raise UserError(f"the {name} runtime needs --url (the server's base URL)")
        # host:port as tritonclient and most server docs write it means plain HTTP.
        url = args.url if "://" in args.url else f"http://{args.url}"
        return cls(
            url, model=args.model, top_k=args.top_k, tokenizer=args.tokenizer, timeout=args.timeout
        )
    if not args.artifact:
        raise UserError(f"the {name} runtime needs ARTIFACT (a checkpoint directory)")
    if name == "trtllm":
        return cls(args.artifact, top_k=args.top_k)
    return cls(args.artifact, dtype=args.dtype, device=args.device, top_k=args.top_k)
