"""Session-scoped Triton fixtures: a small engine build record, its generated repository,
and a real tritonserver (nvidia-pytriton's) serving it with tensorrt_llm replaced by the CPU
executor stand-in. Loaded by tests/triton/conftest.py; other test packages can load it the
same way (e.g. to drive load against `triton_server`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

PROMPT = "What is the capital of France?"


@dataclass(frozen=True)
class TinyBuild:
    hf_dir: Path  # HF checkpoint with the byte-level tokenizer
    checkpoint: Path  # TensorRT-LLM checkpoint, tp 1
    build_dir: Path  # `builder build --dry-run` record
    pytorch_dir: Path  # `builder build --backend pytorch` bundle


@dataclass
class ServedRepository:
    build: TinyBuild
    out: Path  # what `builder triton` wrote
    served: Path  # the model repository the server loads
    server: object  # builder.triton.server.TritonServer

    @property
    def http_url(self) -> str:
        return self.server.http_url

    @property
    def grpc_url(self) -> str:
        return self.server.grpc_url


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory) -> TinyBuild:
    """Every block kind at hidden 64, vocabulary = the byte tokenizer's 261 tokens, fp32."""
    from builder.convert import convert_checkpoint
    from builder.deploy import dry_run_build, load_profile, write_pytorch_serve
    from builder.synth import SynthSpec, write_synthetic

    root = tmp_path_factory.mktemp("triton-build")
    hf = write_synthetic(
        root / "hf", SynthSpec(preset="mixed", hidden=64, vocab=261, dtype="float32")
    )
    checkpoint = root / "trtllm"
    convert_checkpoint(hf, checkpoint, tp=1, progress=False)
    overrides = [("parallel.tp", 1), ("build.max_batch_size", 4)]
    profile = load_profile("h100x8-bf16", overrides)
    build = dry_run_build(checkpoint, profile, root / "engine-record").out
    pytorch = write_pytorch_serve(hf, profile, root / "pytorch-record").out
    return TinyBuild(Path(hf), checkpoint, Path(build), Path(pytorch))


@pytest.fixture(scope="session")
def triton_server(tiny_build, tmp_path_factory):
    """The generated engine repository (decoupled, one instance per model; the BLS model
    accumulates streamed tokens, the ensemble sends each new token's text) served for real."""
    from builder.triton import TritonOptions, read_build_record, write_repository
    from builder.triton.server import ServerUnavailable, TritonServer
    from builder.triton.standin import executor_repository

    root = tmp_path_factory.mktemp("triton-serve")
    out = root / "repo"
    options = TritonOptions(
        tokenizer_dir=tiny_build.hf_dir,
        decoupled=True,
        tokenizer_instances=1,
        bls_instances=1,
        accumulate_tokens=True,
    )
    write_repository(read_build_record(tiny_build.build_dir), options, out)
    served = executor_repository(out, tiny_build.checkpoint, root / "served")
    server = TritonServer(served)
    try:
        server.start(timeout=180)
    except ServerUnavailable as err:
        pytest.skip(f"tritonserver cannot start here: {err}")
    try:
        yield ServedRepository(tiny_build, out, served, server)
    finally:
        server.stop()
