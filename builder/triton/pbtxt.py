"""A writer for Triton's `config.pbtxt` (protobuf text format of `inference.ModelConfig`).

Configurations are built as plain data (mappings, lists, scalars) and written here; no
template is filled, so nothing can be left unfilled. `Enum("TYPE_INT32")` marks a bare enum
token; a mapping is a message; a list of mappings is a repeated message field; a list of
scalars is a repeated scalar field; `parameters` (a `map<string, ModelParameter>`) is given
as a plain str -> str mapping and written as one entry per key. `builder triton check` parses
the result with the ModelConfig protobuf that tritonclient ships.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Enum:
    """A protobuf enum value, written without quotes (TYPE_FP32, KIND_CPU)."""

    token: str


def _scalar(value: Any) -> str:
    if isinstance(value, Enum):
        return value.token
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid text-format string literal
    raise TypeError(f"cannot write {type(value).__name__} {value!r} into config.pbtxt")


def _is_message_list(value: Any) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and bool(value)
        and all(isinstance(v, Mapping) for v in value)
    )


def _field(key: str, value: Any, pad: str) -> list[str]:
    if key == "parameters" and isinstance(value, Mapping):
        lines = []
        for name, text in value.items():
            lines += [
                f"{pad}parameters {{",
                f"{pad}  key: {_scalar(name)}",
                f"{pad}  value {{ string_value: {_scalar(str(text))} }}",
                f"{pad}}}",
            ]
        return lines
    if isinstance(value, Mapping):
        return [f"{pad}{key} {{", *_body(value, pad + "  "), f"{pad}}}"]
    if _is_message_list(value):
        lines = [f"{pad}{key} ["]
        for index, item in enumerate(value):
            comma = "," if index < len(value) - 1 else ""
            lines += [f"{pad}  {{", *_body(item, pad + "    "), f"{pad}  }}{comma}"]
        return lines + [f"{pad}]"]
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]"]
    return [f"{pad}{key}: {_scalar(value)}"]


def _body(message: Mapping[str, Any], pad: str) -> list[str]:
    lines: list[str] = []
    for key, value in message.items():
        lines += _field(key, value, pad)
    return lines


def dumps(config: Mapping[str, Any], header: str = "") -> str:
    """The text of one config.pbtxt; `header` lines become comments."""
    comments = [f"# {line}".rstrip() for line in header.splitlines()]
    return "\n".join([*comments, *_body(config, "")]) + "\n"
