"""Import graph of builder's subpackages, checked against the layer order.

    python scripts/import_graph.py          # graph by layer, then violations; exit 1 if any
    python scripts/import_graph.py --json

Every `import builder.X...` / `from builder.X import ...` counts, lazy ones inside functions
included (an import that runs later is still a dependency), and so does a string that is
exactly a builder module path (the lazy export tables of `__init__` modules and
`importlib.import_module` calls). A module may import its own layer and the layers below it;
FORBIDDEN lists the pairs a layer order cannot express. tests/test_layering.py fails on any
violation.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "builder"
PACKAGE = "builder"
# Bottom first. The package root (`builder/__init__.py`, named "builder") only installs the
# lazy Auto-class hook, so it sits with the model it registers.
LAYERS: tuple[tuple[str, frozenset[str]], ...] = tuple(
    (name, frozenset(parts.split()))
    for name, parts in (
        ("foundation", "errors units dtypes registry _data progress chat"),
        ("architecture", "arch"),
        ("io", "io"),
        ("model", "model builder _autoregister synth smollm2"),
        ("convert", "convert"),
        ("runtime", "runtime"),
        ("quantize", "quantize"),
        ("products", "verify bench report deploy triton check"),
        ("interface", "cli demo __main__"),
    )
)
# Readers of TensorRT-LLM checkpoints use builder.io.trtllm_checkpoint, never the converter.
FORBIDDEN = {
    ("deploy", "convert"): "read checkpoints with builder.io.trtllm_checkpoint",
    ("triton", "convert"): "read checkpoints with builder.io.trtllm_checkpoint",
    ("bench", "convert"): "read checkpoints with builder.io.trtllm_checkpoint",
}
MODULE_PATH = re.compile(r"^builder(\.[A-Za-z_][A-Za-z0-9_]*)+$")


@dataclass(frozen=True)
class Edge:
    source: str  # subpackage (or top-level module) that imports
    target: str  # subpackage it imports
    where: str  # file:line


def layer_of(part: str) -> int:
    for rank, (_, members) in enumerate(LAYERS):
        if part in members:
            return rank
    raise KeyError(f"{part}: not in any layer of scripts/import_graph.py LAYERS; add it there")


def _part(module_file: Path, root: Path) -> str:
    parts = module_file.relative_to(root).with_suffix("").parts
    if parts == ("__init__",):
        return PACKAGE
    return parts[0]


def _imported(tree: ast.AST) -> Iterator[tuple[str, int]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, node.lineno
            if node.module == PACKAGE:  # from builder import convert
                for alias in node.names:
                    yield f"{PACKAGE}.{alias.name}", node.lineno
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and MODULE_PATH.match(node.value)
        ):
            yield node.value, node.lineno


def edges(root: Path = ROOT) -> list[Edge]:
    found = []
    known = {p.stem for p in root.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    for path in sorted(root.rglob("*.py")):
        source = _part(path, root)
        for module, line in _imported(ast.parse(path.read_text(), str(path))):
            head, _, rest = module.partition(".")
            target = rest.split(".")[0]
            if head != PACKAGE or not target or target not in known or target == source:
                continue
            found.append(Edge(source, target, f"{path.relative_to(root.parent)}:{line}"))
    return found


def graph(found: list[Edge]) -> dict[str, list[str]]:
    out: dict[str, set[str]] = {}
    for edge in found:
        out.setdefault(edge.source, set()).add(edge.target)
    return {source: sorted(targets) for source, targets in sorted(out.items())}


def violations(found: list[Edge]) -> list[str]:
    problems = []
    for edge in found:
        low, high = layer_of(edge.source), layer_of(edge.target)
        if high > low:
            problems.append(
                f"{edge.where}: {edge.source} ({LAYERS[low][0]}) imports {edge.target} "
                f"({LAYERS[high][0]}), a layer above it"
            )
        elif (edge.source, edge.target) in FORBIDDEN:
            why = FORBIDDEN[edge.source, edge.target]
            problems.append(f"{edge.where}: {edge.source} imports {edge.target}: {why}")
    return problems


def render(found: list[Edge]) -> str:
    deps = graph(found)
    lines = []
    for rank in reversed(range(len(LAYERS))):
        name, members = LAYERS[rank]
        lines.append(f"[{rank}] {name}")
        for part in sorted(members):
            targets = deps.get(part, [])
            shown = ", ".join(f"{t}({layer_of(t)})" for t in targets) or "-"
            lines.append(f"    {part:<13} -> {shown}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="graph and violations as JSON")
    args = parser.parse_args(argv)
    found = edges()
    problems = violations(found)
    if args.json:
        print(json.dumps({"graph": graph(found), "violations": problems}, indent=2))
    else:
        print(render(found))
        print(f"\n{len(found)} imports, {len(problems)} upward or forbidden")
        for problem in problems:
            print(f"  {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
