"""Goldens and FP8 exports shared by the verify tests (written once per session)."""

from __future__ import annotations

import pytest

# Small sizes: each golden prompt costs one streamed pass, each greedy token one more.
SMOL_GOLDEN = {"windows": 2, "seq_len": 64, "chat_prompts": 1, "continuation": 8, "dtype": "float32"}


@pytest.fixture(autouse=True, scope="module")
def _small_matrices(one_torch_thread):
    pass


@pytest.fixture(scope="session")
def smollm2_golden(tmp_path_factory, smollm2_ckpt):
    from builder.verify.golden import GoldenSettings, build_golden

    return build_golden(smollm2_ckpt, tmp_path_factory.mktemp("golden") / "smollm2", GoldenSettings(**SMOL_GOLDEN))


def _servers_module():
    """tests/servers.py, loaded by path (pytest runs with --import-mode=importlib)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "servers.py"
    spec = importlib.util.spec_from_file_location("builder_test_servers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


servers = _servers_module()


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
def vllm_url(smollm2_llama_dir, tmp_path_factory):
    """vLLM (CPU) serving SmolLM2 on 127.0.0.1; skipped only when .venv-vllm is absent."""
    ok, why = servers.vllm_available()
    if not ok:
        pytest.skip(why)
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    with servers.vllm_server(smollm2_llama_dir, log) as (url, seconds):
        print(f"\nvLLM ready in {seconds:.0f} s at {url} (log {log})")
        yield url
