"""When the worker pool forks from the caller and when it needs its fork server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import threading
from builder.convert.workers import can_fork
plain, preload = can_fork(), can_fork(["builder.quantize.export_trtllm"])
stop = threading.Event()
threading.Thread(target=stop.wait).start()
threaded = can_fork()
stop.set()
print(plain, preload, threaded)
"""


def test_only_a_single_threaded_caller_without_preloads_forks():
    """A plain conversion in a fresh interpreter forks (workers in milliseconds); a transform
    to preload or a second thread sends the pool to its fork server instead."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False", "False"]
