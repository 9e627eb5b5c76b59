"""HF nemotron-nas checkpoint -> TensorRT-LLM checkpoint: split rules, streaming rank files.

Public API (other stages call these):
- `convert(ConvertRequest(src, out, tp, pp=1, dtype="auto", workers=1, ranks=None, ...),
  progress=None, pool=None)` -> ConvertSummary (rank states: `RankState`);
  `convert_checkpoint(src, out, tp, **fields)` builds the request for scripts and tests
- `write_dry_run(plan, out, tp, pp, dtype, source=..., ...)`: manifest of what would be written
- `trtllm_config(plan, tp, pp, dtype, quantization)` (reading back: builder.io.trtllm_checkpoint)
- `RankTransform`, `Fp8Layout`, `rank_layout`: the hook quantize uses to write FP8 ranks
- `write_rank_file(...)`: one rank file, streamed
- `WorkerPool(workers)`: worker processes, startable before torch is imported
- `split_tensor` / `merge_tensor` and the per-kind `split_*` / `merge_*` rules
- `check_checkpoint(dir, source=None)`, `unshard(dir)` / `roundtrip_problems(dir, hf_dir)`
"""

import importlib
from typing import Any

# Names resolve on first use (PEP 562), so `import builder.convert.workers` stays free of torch.
_EXPORTS = {
    "Fp8Layout": "layout",
    "RankLayout": "layout",
    "RankTransform": "layout",
    "rank_layout": "layout",
    "ConvertRequest": "pipeline",
    "ConvertSummary": "pipeline",
    "RankState": "pipeline",
    "convert": "pipeline",
    "RankStatus": "pipeline",
    "convert_checkpoint": "pipeline",
    "write_dry_run": "pipeline",
    "RankResult": "rank_writer",
    "write_rank_file": "rank_writer",
    "merge_tensor": "split",
    "split_tensor": "split",
    "trtllm_config": "trtllm_config",
    "WorkerPool": "workers",
}

__all__ = [
    "ConvertRequest",
    "ConvertSummary",
    "Fp8Layout",
    "RankLayout",
    "RankResult",
    "RankState",
    "RankStatus",
    "RankTransform",
    "WorkerPool",
    "convert",
    "convert_checkpoint",
    "merge_tensor",
    "rank_layout",
    "split_tensor",
    "trtllm_config",
    "write_dry_run",
    "write_rank_file",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'builder.convert' has no attribute {name!r}")
    return getattr(importlib.import_module(f"builder.convert.{_EXPORTS[name]}"), name)
