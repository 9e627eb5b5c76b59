"""Reference execution of TensorRT-LLM checkpoints in PyTorch (for machines without TensorRT-LLM).

- `TrtllmCheckpointExecutor(dir, dtype)`: runs a checkpoint rank by rank, TP partials summed
  as the all-reduce would, pipeline stages in order; FP8 weights and KV cache emulated.
  `executor.generate(prompts, max_new_tokens, eos_id)` decodes greedily through a per-layer
  KV cache (`KVCache`; `prefill` once, then `decode_step`), batched with left padding.
- `ResidentRuntime.from_checkpoint(dir, device="cuda")` (or `.from_tensors(config, tensors)`):
  weights resident on the device, a static KV cache, `prefill` / `decode` / `generate`, CUDA
  graphs and Triton kernels on a GPU (builder/runtime/resident.py, docs/gpu.md).
- `compare_with_reference(trtllm_dir, hf_dir, prompt=..., dtype=...)` -> Comparison
  (max/relative logit error against builder.model's native reference model).
"""

from builder.runtime.compare import Comparison, compare_logits, compare_with_reference
from builder.runtime.executor import (
    Generation,
    KVCache,
    LinearCall,
    TrtllmCheckpointExecutor,
    fp8_linear,
    rope_inv_freq,
)
from builder.runtime.resident import ResidentRuntime

__all__ = [
    "Comparison",
    "Generation",
    "KVCache",
    "LinearCall",
    "ResidentRuntime",
    "TrtllmCheckpointExecutor",
    "compare_logits",
    "compare_with_reference",
    "fp8_linear",
    "rope_inv_freq",
]
