"""Loads the shared Triton fixtures of tests/servers_triton.py (tests/ is not a package), so
`builder bench --triton` can drive AIPerf against the real tritonserver."""

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "servers_triton", Path(__file__).parents[1] / "servers_triton.py"
)
servers_triton = sys.modules.setdefault("servers_triton", importlib.util.module_from_spec(_spec))
if not hasattr(servers_triton, "tiny_build"):
    _spec.loader.exec_module(servers_triton)

tiny_build = servers_triton.tiny_build
triton_server = servers_triton.triton_server
