"""Triton Inference Server model repositories for both serving paths, and their check.

- `read_build_record(BUILD_DIR)` -> BuildRecord: what `builder build` recorded (engine
  config.json, --dry-run record, or --backend pytorch bundle)
- `write_repository(record, TritonOptions(...), OUT)`: the in-flight batching repository
  (engines) or the LLM-API repository (PyTorch backend), with launch scripts and a manifest
- `check_repository(OUT)` -> list[Finding]: protobuf parse of every config.pbtxt and the
  cross-model checks (wiring, batch sizes, decoupled mode, world size, tokenizer)
- `TritonServer(repo).start()`: the real tritonserver bundled in nvidia-pytriton, on loopback
- `serve_with_executor(repo, checkpoint, OUT)`: a copy of a repository whose tensorrt_llm model
  is the CPU stand-in running builder's checkpoint executor
"""

from builder.triton.record import BuildRecord, read_build_record
from builder.triton.repository import TritonOptions, load_tokenizer, write_repository

__all__ = [
    "BuildRecord",
    "TritonOptions",
    "load_tokenizer",
    "read_build_record",
    "write_repository",
]
