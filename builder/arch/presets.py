"""Built-in model presets shipped as package data: the real Ultra and Super configs and `mixed`."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from builder.arch.plan import ModelPlan, parse_config
from builder.errors import UserError

PRESETS = {
    "ultra-253b": "Llama-3.1-Nemotron-Ultra-253B-v1 config.json (162 blocks)",
    "super-49b": "Llama-3.3-Nemotron-Super-49B-v1 config.json (80 blocks)",
    "mixed": "small test model with every block kind and 1, 2, 4 and 8 KV heads",
}


def preset_config(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    text = resources.files("builder.arch").joinpath("presets", f"{name}.json").read_text()
    return json.loads(text)


def preset_plan(name: str) -> ModelPlan:
    return parse_config(preset_config(name), source=f"preset {name}")
