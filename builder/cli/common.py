"""Options and helpers shared by several commands."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from builder.arch import PRESETS, ModelPlan, load_plan, preset_plan
from builder.errors import UserError

preset_option = click.option(
    "--preset",
    type=click.Choice(sorted(PRESETS)),
    help="Use a built-in config instead of a checkpoint: " + "; ".join(
        f"{k}: {v}" for k, v in PRESETS.items()
    ),
)


def resolve_plan(checkpoint: str | None, preset: str | None) -> ModelPlan:
    """The plan of CHECKPOINT or of --preset; exactly one must be given."""
    if bool(checkpoint) == bool(preset):
        raise UserError("give either a checkpoint directory or --preset NAME (not both)")
    return preset_plan(preset) if preset else load_plan(checkpoint)


def echo_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    raise AssertionError


def human_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return str(int(n))
