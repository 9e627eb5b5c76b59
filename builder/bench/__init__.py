"""`builder bench`: throughput and latency of an artifact, as run records.

- `metrics`: every metric's definition, written once (AIPerf / vLLM / trtllm-bench names mapped);
- `workload`: ISL/OSL pairs, concurrency levels, seeded prompts of exact ISL, fixed OSL;
- `inprocess`: a TensorRT-LLM checkpoint through builder's executor (not an engine);
- `aiperf`: a live server (OpenAI-compatible or Triton) driven by NVIDIA AIPerf, its export
ingested;
- `imports`: `trtllm-bench --report_json` and AIPerf `profile_export_aiperf.json` as records.
"""
