"""Options and helpers shared by several commands."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from builder.arch import PRESETS, ModelPlan, load_plan, preset_plan
from builder.errors import UserError
from builder.units import human_bytes, human_count  # noqa: F401  (re-exported for the commands)

preset_option = click.option(
    "--preset",
    type=click.Choice(sorted(PRESETS)),
    help="Use a built-in config instead of a checkpoint: "
    + "; ".join(f"{k}: {v}" for k, v in PRESETS.items()),
)


def resolve_plan(checkpoint: str | None, preset: str | None) -> ModelPlan:
    """The plan of CHECKPOINT or of --preset; exactly one must be given."""
    if bool(checkpoint) == bool(preset):
        raise UserError("give either a checkpoint directory or --preset NAME (not both)")
    return preset_plan(preset) if preset else load_plan(checkpoint)


def echo_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")
