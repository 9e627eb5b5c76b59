"""The layer order of builder's subpackages (scripts/import_graph.py) holds: no upward imports."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "import_graph.py"


def _script():
    spec = importlib.util.spec_from_file_location("import_graph", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_no_upward_or_forbidden_imports():
    graph = _script()
    found = graph.edges()
    assert len(found) > 100  # the scan saw the package, not an empty directory
    assert graph.violations(found) == []


def test_only_the_entry_point_imports_the_cli():
    importers = {e.source for e in _script().edges() if e.target == "cli"}
    assert importers == {"__main__"}


def test_readers_of_trtllm_checkpoints_do_not_import_convert():
    users = {e.source for e in _script().edges() if e.target == "convert"}
    assert not users & {"runtime", "deploy", "triton", "bench"}


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "builder" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "builder"


def test_an_upward_import_is_reported_with_its_file_and_line(tmp_path):
    graph = _script()
    root = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "io/__init__.py": "",
            "io/reader.py": "import os\n\ndef f():\n    from builder.cli import main\n",
            "cli/__init__.py": "def main(): ...\n",
            "convert/__init__.py": '_EXPORTS = {"x": "builder.quantize.pipeline"}\n',
            "quantize/__init__.py": "",
        },
    )
    problems = graph.violations(graph.edges(root))
    assert problems == [
        "builder/convert/__init__.py:1: convert (convert) imports quantize (quantize), "
        "a layer above it",
        "builder/io/reader.py:4: io (io) imports cli (interface), a layer above it",
    ]
