"""Shared test checkpoints, written once per test session by builder itself."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# 24 Ultra layers (divisible by pp 1, 2, 3, 4, 6) covering GQA+MLP, empty blocks, FFN-only
# blocks, the FFN-fusion widths (125, 134, 143, 149) and the widest-to-narrowest MLPs.
ULTRA_LAYERS = "0-1,9-10,42-44,96-97,99,125,134,143,149-152,153-161"


@pytest.fixture(scope="session")
def mixed_ckpt(tmp_path_factory):
    """Every block kind, KV heads 1/2/4/8, hidden 256, 16 heads, bf16."""
    from builder.synth import SynthSpec, write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("ckpt") / "mixed", SynthSpec(preset="mixed"))


@pytest.fixture(scope="session")
def mixed_ckpt_fp32(tmp_path_factory):
    from builder.synth import SynthSpec, write_synthetic

    spec = SynthSpec(preset="mixed", dtype="float32")
    return write_synthetic(tmp_path_factory.mktemp("ckpt") / "mixed32", spec)


@pytest.fixture(scope="session")
def ultra_ckpt(tmp_path_factory):
    """A 24-layer slice of the Ultra pattern at hidden 128, bf16."""
    from builder.synth import SynthSpec, write_synthetic

    spec = SynthSpec(preset="ultra-253b", hidden=128, layers=ULTRA_LAYERS)
    return write_synthetic(tmp_path_factory.mktemp("ckpt") / "ultra", spec)


@pytest.fixture(scope="session")
def smollm2_ckpt(tmp_path_factory):
    """The real SmolLM2-135M-Instruct weights as a nemotron-nas checkpoint (fp32)."""
    from builder.smollm2 import import_smollm2

    return import_smollm2(tmp_path_factory.mktemp("ckpt") / "smollm2")


@pytest.fixture(scope="session")
def smollm2_nas_ckpt(tmp_path_factory):
    """SmolLM2 with some blocks turned into no-op and linear ones (structure tests)."""
    from builder.smollm2 import import_smollm2

    return import_smollm2(tmp_path_factory.mktemp("ckpt") / "smollm2-nas", nas_variant=True)


@pytest.fixture(scope="session")
def smollm2_fp8(tmp_path_factory, smollm2_ckpt):
    """FP8 SmolLM2 (both exports), calibrated as calib/thresholds.toml [smollm2-ci] says."""
    from builder.quantize.pipeline import quantize_checkpoint
    from builder.verify.fp8_accuracy import threshold_setup

    setup = threshold_setup("smollm2-ci")
    out = tmp_path_factory.mktemp("fp8") / "smollm2-fp8"
    summary = quantize_checkpoint(
        smollm2_ckpt,
        out,
        calib_size=setup["calib_size"],
        calib_seq_len=setup["calib_seq_len"],
        dtype=setup["dtype"],
    )
    (out.parent / "summary.txt").write_text(
        f"calibration {summary.seconds['calibration']:.1f} s, peak RSS "
        f"{summary.peak_rss_bytes / 2**20:,.0f} MiB\n"
    )
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small-matrix tests: with two threads, a busy 2-core machine spends most of each tiny
    matmul in OpenMP barriers (measured 10x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _helper_module(filename: str, name: str):
    """A helper module of tests/, loaded by path (pytest runs with --import-mode=importlib) and
    registered under `name` (its dataclasses resolve their annotations there)."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


servers = _helper_module("servers.py", "builder_test_servers")
# One tritonserver for the whole session: the Triton tests and `bench --triton` share it.
_triton = _helper_module("servers_triton.py", "servers_triton")
tiny_build, triton_server = _triton.tiny_build, _triton.triton_server


@pytest.fixture(scope="session")
def smollm2_llama_dir(tmp_path_factory, smollm2_ckpt):
    """The session's SmolLM2 weights (linked, not copied) under a plain Llama config.json."""
    import json

    from builder.smollm2 import llama_config, locate_gguf, open_gguf

    gguf = locate_gguf()
    out = tmp_path_factory.mktemp("served") / "smollm2-llama"
    out.mkdir()
    for item in smollm2_ckpt.iterdir():
        if item.name not in ("config.json", "manifest.json"):
            (out / item.name).symlink_to(item)
    facts = open_gguf(gguf, gguf.stat().st_mtime_ns).facts()
    (out / "config.json").write_text(json.dumps(llama_config(facts), indent=1))
    return out


@pytest.fixture(scope="session")
def openai_server(smollm2_llama_dir, tmp_path_factory):
    """Base URL of vLLM (CPU) serving SmolLM2 as `smollm2` on 127.0.0.1, one for the whole
    session (verify and bench tests share it); skipped only when .venv-vllm is absent."""
    ok, why = servers.vllm_available()
    if not ok:
        pytest.skip(why)
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    with servers.vllm_server(smollm2_llama_dir, log) as (url, seconds):
        print(f"\nvLLM ready in {seconds:.0f} s at {url} (log {log})")
        yield url
