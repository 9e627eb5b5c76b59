"""A real `tritonserver` on loopback: the one bundled in nvidia-pytriton (Triton 2.51, CPU).

`TritonServer(repo).start()` launches the server binary with the Python backend, waits until
every model is ready (bounded), and `stop()` kills it and its backend stubs (own process
group, so no stub outlives it). Nothing here imports nvidia-pytriton's Python API: only its
files are used (the binary, the vendored libraries, the Python backend and its stubs).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from builder.errors import UserError

START_TIMEOUT_S = 120.0


class ServerUnavailable(UserError):
    """The bundled tritonserver is missing or its binary cannot run on this machine."""


class ServerFailed(UserError):
    """tritonserver ran but did not become ready (a model failed to load, or too slow)."""


# The binary itself cannot run here (missing glibc/libraries, not executable).
_CANNOT_RUN = (
    "error while loading shared libraries",
    "GLIBC_",
    "cannot execute",
    "Exec format error",
)


@dataclass(frozen=True)
class BundledTriton:
    """Paths inside an installed nvidia-pytriton wheel."""

    binary: Path
    libs: Path
    backend: Path  # holds libtriton_python.so and triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub for this Python version


def bundled_triton() -> BundledTriton:
    """Locate the server files of nvidia-pytriton without importing it (its API pins numpy<2)."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerUnavailable(
            "nvidia-pytriton is not installed (pip install --no-deps nvidia-pytriton==0.7.0)"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    found = BundledTriton(
        binary=root / "tritonserver" / "bin" / "tritonserver",
        libs=root.parent / "nvidia_pytriton.libs",
        backend=root / "tritonserver" / "backends" / "python",
        stub=root
        / "tritonserver"
        / "python_backend_stubs"
        / version
        / "triton_python_backend_stub",
    )
    for path in (found.binary, found.libs, found.backend / "libtriton_python.so", found.stub):
        if not path.exists():
            raise ServerUnavailable(f"{path}: missing from nvidia-pytriton")
    return found


# The bundled Python-backend stub's pybind11 was built against numpy 1.x: under numpy 2 it
# hands string tensors to Python with every byte replaced by the first one. The stub gets
# numpy 1.26 from this directory (scripts/install.sh installs it there), ahead of the venv.
STUB_SITE = Path(sys.prefix) / "triton-stub-site"
STUB_NUMPY_HINT = f"pip install --no-deps --target {STUB_SITE} numpy==1.26.4"


def stub_site() -> Path:
    numpy_dir = STUB_SITE / "numpy"
    if not numpy_dir.is_dir():
        raise ServerUnavailable(
            f"{STUB_SITE}: no numpy 1.x for the Python-backend stub (its pybind11 needs numpy<2; "
            f"numpy 2 corrupts string tensors): {STUB_NUMPY_HINT}"
        )
    return STUB_SITE


def python_paths() -> list[str]:
    """Directories the Python-backend stub needs on sys.path: numpy 1.x (stub_site), this
    interpreter's packages (transformers, torch) and the directory holding `builder`."""
    import sysconfig

    import builder

    paths = [
        str(stub_site()),
        sysconfig.get_paths()["purelib"],
        sysconfig.get_paths()["platlib"],
        str(Path(builder.__file__).resolve().parents[1]),
    ]
    return list(dict.fromkeys(paths))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def backend_directory(bundle: BundledTriton, where: Path) -> Path:
    """A --backend-directory whose python/ pairs the backend with this Python's stub."""
    python = where / "python"
    python.mkdir(parents=True, exist_ok=True)
    for source in (
        bundle.backend / "libtriton_python.so",
        bundle.backend / "triton_python_backend_utils.py",
        bundle.stub,
    ):
        link = python / source.name
        if not link.exists():
            link.symlink_to(source)
    return where


def _wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
    """Until no process of group `pgid` is left (killed stubs take a moment to exit)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


@dataclass
class TritonServer:
    """One tritonserver process serving `repository` on 127.0.0.1 (HTTP and gRPC)."""

    repository: Path
    http_port: int = 0
    grpc_port: int = 0
    log_path: Path | None = None
    extra_args: tuple[str, ...] = ()
    auto_complete: bool = False  # the LLM-API model sets max_batch_size/decoupled through it
    process: subprocess.Popen | None = field(default=None, repr=False)
    startup_seconds: float | None = None
    final_log: str = ""  # the log's tail, kept when stop() removes the temporary log
    shm_prefix: str = field(default_factory=lambda: f"builder_triton_{uuid.uuid4().hex[:12]}_")
    _workdir: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command(self, bundle: BundledTriton, backends: Path) -> list[str]:
        return [
            str(bundle.binary),
            "--model-repository",
            str(Path(self.repository).resolve()),
            "--backend-directory",
            str(backends),
            "--http-address",
            "127.0.0.1",
            "--http-port",
            str(self.http_port),
            "--grpc-address",
            "127.0.0.1",
            "--grpc-port",
            str(self.grpc_port),
            "--allow-metrics=false",
            "--exit-on-error=true",
            "--strict-readiness=true",
            "--exit-timeout-secs=5",
            *(() if self.auto_complete else ("--disable-auto-complete-config",)),
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            *self.extra_args,
        ]

    def start(self, timeout: float = START_TIMEOUT_S) -> TritonServer:
        bundle = bundled_triton()
        self.http_port = self.http_port or free_port()
        self.grpc_port = self.grpc_port or free_port()
        self._workdir = tempfile.TemporaryDirectory(prefix="builder-triton-")
        work = Path(self._workdir.name)
        backends = backend_directory(bundle, work / "backends")
        self.log_path = self.log_path or work / "tritonserver.log"
        env = {
            **os.environ,
            "LD_LIBRARY_PATH": os.pathsep.join(
                p for p in (str(bundle.libs), os.environ.get("LD_LIBRARY_PATH", "")) if p
            ),
            # The stub's embedded interpreter ignores PYTHONPATH; our model.py files read this.
            "BUILDER_TRITON_PYTHONPATH": os.pathsep.join(python_paths()),
        }
        started = time.perf_counter()
        with open(self.log_path, "w") as log:
            # A new session: stop() signals the whole group, backend stubs included.
            self.process = subprocess.Popen(
                self.command(bundle, backends),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.perf_counter() - started
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                log = self.log_tail(400)
                cannot_run = self.process.returncode in (126, 127) or any(
                    m in log for m in _CANNOT_RUN
                )
                error = ServerUnavailable if cannot_run else ServerFailed
                raise error(
                    f"tritonserver exited with code {self.process.returncode} before it was "
                    "ready:\n"
                    f"{self.errors()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise ServerFailed(f"tritonserver not ready after {timeout:.0f} s:\n{self.errors()}")

    def errors(self) -> str:
        """The log's error lines (glog severity E, `error:`), or its last lines if it has none."""
        lines = self.log_tail(2000).splitlines()
        found = [
            line
            for line in lines
            if line[:1] == "E" and line[1:2].isdigit() or line.startswith("error:")
        ]
        return "\n".join(found[-20:]) or "\n".join(lines[-25:])

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])
        except (OSError, TypeError):
            return ""

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM to the server (it unloads the models and stops their stubs), SIGKILL to its
        whole process group after `grace` seconds or once it has exited, so nothing outlives it."""
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(grace)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(process.pid, signal.SIGKILL)  # the server if still up, and any stub left
            except ProcessLookupError:
                pass
            process.wait()
            _wait_group_gone(process.pid)
            # Shared-memory regions of killed stubs would outlive them.
            for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
                region.unlink(missing_ok=True)
        if self._workdir is not None:
            self.final_log = self.log_tail(200)
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> Self:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
