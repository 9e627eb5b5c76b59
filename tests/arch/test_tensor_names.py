"""Tensor names live in one module: builder/arch/tensors.py (the role table).

Scans every other module of builder/ for string literals that spell a tensor name (HF,
TensorRT-LLM, GGUF, ModelOpt quantizer or FP8 scale names, layer-prefix regexes) and for code
that reads a layer index out of a dotted name (`int(name.split(".")[2])`). Tensor names never
contain whitespace, so only whitespace-free literals (and the whitespace-free pieces of
f-strings) are names; docstrings and prose messages that mention a tensor for a reader are not.

Run as a script for the counts: `python tests/arch/test_tensor_names.py`.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "builder"
ROLE_TABLE = {PACKAGE / "arch" / "tensors.py"}

NAME_FRAGMENTS = re.compile(
    "|".join(
        [
            # HF
            r"self_attn",
            r"\bmlp\.",
            r"\b[qkvo]_proj\b",
            r"\b(gate|up|down)_proj\b",
            r"linear_attn",
            r"linear_mlp",
            r"input_layernorm",
            r"post_attention_layernorm",
            r"embed_tokens",
            r"model\.norm",
            r"model\.layers",
            r"^lm_head",
            r"\*lm_head",
            # TensorRT-LLM
            r"post_layernorm",
            r"vocab_embedding",
            r"\bln_f\b",
            r"attention\.(qkv|dense)",
            r"\bffn\.(fc|gate|proj)\b",
            r"mlp\.fc",
            r"transformer\.",
            r"weights_scaling_factor",
            r"activation_scaling_factor",
            r"kv_cache_scaling_factor",
            # ModelOpt quantizers and unified-HF scales
            r"weight_quantizer",
            r"input_quantizer",
            r"bmm_quantizer",
            r"\bweight_scale\b",
            r"\binput_scale\b",
            r"^[kv]_scale$",
            r"_proj\.",
            # GGUF
            r"\bblk\.",
            r"token_embd",
            r"\battn_(norm|q|k|v|output)\b",
            r"\bffn_(norm|gate|up|down)\b",
            r"output_norm",
            # regexes / prefixes that parse a layer index out of a name
            r"layers\\?\.",
        ]
    )
)


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def _is_split_on_dot(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("split", "rsplit")
        and bool(node.args)
        and isinstance(node.args[0], ast.Constant)
        and node.args[0].value == "."
    )


def _layer_index_parse(node: ast.AST) -> bool:
    """`x.split(".")[2]` (where HF and TensorRT-LLM names keep the layer index) or
    `int(x.split(".")[k])`."""
    if isinstance(node, ast.Subscript) and _is_split_on_dot(node.value):
        index = node.slice
        return isinstance(index, ast.Constant) and index.value == 2
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "int":
        arg = node.args[0] if node.args else None
        return isinstance(arg, ast.Subscript) and _is_split_on_dot(arg.value)
    return False


def offences(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    docstrings = _docstrings(tree)
    rel = path.relative_to(ROOT)
    found = []
    for node in ast.walk(tree):
        if _layer_index_parse(node):
            found.append(f"{rel}:{node.lineno}: parses a layer index out of a name")
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            continue
        if id(node) in docstrings or any(c.isspace() for c in node.value):
            continue
        match = NAME_FRAGMENTS.search(node.value)
        if match:
            found.append(f"{rel}:{node.lineno}: tensor-name literal {node.value!r}")
    return found


def all_offences() -> list[str]:
    return [
        offence
        for path in sorted(PACKAGE.rglob("*.py"))
        if path not in ROLE_TABLE
        for offence in offences(path)
    ]


def test_tensor_names_are_spelled_only_in_the_role_table():
    found = all_offences()
    assert not found, "tensor names outside builder/arch/tensors.py:\n" + "\n".join(found)


def test_the_scan_sees_what_it_must_refuse(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        '"""Docstrings may say self_attn.q_proj."""\n'
        'A = "model.layers.{i}.self_attn.q_proj"\n'
        'B = f"{p}.attention.qkv"\n'
        'C = r"layers\\.(\\d+)"\n'
        'D = "weights_scaling_factor"\n'
        'E = "lm_head"\n'
        'F = "error: the lm_head differs"\n'
        "G = int(name.split('.')[2])\n"
    )
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = offences(sample)
    finally:
        ROOT = saved
    lines = sorted(int(f.split(":")[1]) for f in found)
    assert lines == [2, 3, 4, 5, 6, 8, 8], found


def test_role_table_module_does_spell_them():
    """The scan is not vacuous: the role table itself is full of what it forbids elsewhere."""
    assert len([o for path in ROLE_TABLE for o in offences(path)]) >= 20


if __name__ == "__main__":
    found = all_offences()
    table = [o for path in ROLE_TABLE for o in offences(path)]
    print("\n".join(found))
    print(f"tensor-name literals / layer-index parses outside the role table: {len(found)}")
    print(f"... inside builder/arch/tensors.py: {len(table)}")
    sys.exit(1 if found else 0)
