"""Turn what `builder plan` is given (HF dir, TensorRT-LLM checkpoint, preset) into plans."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from builder.arch import ModelPlan, load_plan, preset_plan
from builder.deploy.inputs import is_trtllm_checkpoint, read_trtllm_input, trtllm_mismatches
from builder.deploy.planner import TargetPlan, plan_target
from builder.deploy.profiles import MISSION_TARGETS, TargetProfile, load_profile, with_overrides
from builder.errors import UserError


def plan_of_source(directory: str | Path | None = None, preset: str | None = None) -> ModelPlan:
    """The model plan of an HF directory, a TensorRT-LLM checkpoint, or a preset (one of them)."""
    if (directory is None) == (preset is None):
        raise UserError("give either a checkpoint directory or --preset NAME (not both)")
    if preset is not None:
        return preset_plan(preset)
    path = Path(directory)
    if is_trtllm_checkpoint(path):
        return read_trtllm_input(path).plan
    return load_plan(path)


def plan_for(
    target: str | TargetProfile,
    directory: str | Path | None = None,
    preset: str | None = None,
    overrides: Iterable[tuple[str, Any]] = (),
) -> TargetPlan:
    """Plan of a source on a target (a shipped name, a TOML path or a loaded profile).

    For a TensorRT-LLM checkpoint, differences between it and the target are added as warnings.
    """
    overrides = tuple(overrides)
    if isinstance(target, TargetProfile):
        profile = with_overrides(target, overrides) if overrides else target
    else:
        profile = load_profile(target, overrides)
    result = plan_target(plan_of_source(directory, preset), profile)
    if directory is not None and is_trtllm_checkpoint(Path(directory)):
        result.warnings += trtllm_mismatches(read_trtllm_input(directory), profile)
    return result


def mission_plans(
    preset: str = "ultra-253b",
    targets: Iterable[str] = MISSION_TARGETS,
    overrides: Iterable[tuple[str, Any]] = (),
) -> list[TargetPlan]:
    """The plan of a preset (default: the real Ultra config) on each mission target."""
    overrides = tuple(overrides)
    return [plan_for(target, preset=preset, overrides=overrides) for target in targets]
