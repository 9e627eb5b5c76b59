"""A dependency-free YAML writer for the small option files TensorRT-LLM reads.

Only what those files need: nested mappings, scalars and flat lists. Strings are written as
JSON strings, which are valid YAML double-quoted scalars, so no value can change type or
break the document.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    if isinstance(value, str):
        return json.dumps(value)
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as a YAML scalar")


def _lines(data: Mapping[str, Any], indent: int) -> list[str]:
    pad = "  " * indent
    out = []
    for key, value in data.items():
        if not isinstance(key, str) or not key.replace("_", "").isalnum():
            raise ValueError(f"unsupported YAML key {key!r}")
        if isinstance(value, Mapping):
            out.append(f"{pad}{key}:")
            out.extend(_lines(value, indent + 1))
        elif isinstance(value, Sequence) and not isinstance(value, str):
            out.append(f"{pad}{key}: [{', '.join(_scalar(v) for v in value)}]")
        else:
            out.append(f"{pad}{key}: {_scalar(value)}")
    return out


def dump_yaml(data: Mapping[str, Any], header: str = "") -> str:
    comments = [f"# {line}".rstrip() for line in header.splitlines()]
    return "\n".join(comments + _lines(data, 0)) + "\n"
