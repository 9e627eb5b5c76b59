"""Target profiles, the memory/KV/disk planner, the trtllm-build driver and PyTorch-backend options.

Public API:
- `load_profile(name_or_path, overrides=())` -> TargetProfile; `shipped_profiles()`;
  `parse_override("build.max_batch_size=32")`; `MISSION_TARGETS`
- `plan_target(model_plan, profile)` -> TargetPlan (`.to_dict()`, `.fits`, `.verdict`);
  `plan_for(target, directory=None, preset=None, overrides=())` resolves a directory / preset
  and a target; `mission_plans("ultra-253b")` -> the three mission targets' plans;
  `render_plan(result)` (rich) and `plan_text(result)` (plain text)
- `pp_balance(plan, pp)`, `balanced_partition(plan, pp)`
- `dry_run_build(ckpt_dir, profile, out)` / `build_engines(ckpt_dir, profile, out)` -> BuildResult
- `write_pytorch_serve(hf_dir, profile, out)` -> BuildResult
- `trtllm_build_args(profile, ckpt, out)`, `arg_problems(args)`, `load_flag_set()`,
  `trtllm_status()`
"""

from builder.deploy.engine import (
    BuildResult,
    TrtllmUnavailable,
    build_engines,
    dry_run_build,
    trtllm_build_args,
    trtllm_status,
)
from builder.deploy.planner import TargetPlan, balanced_partition, plan_target, pp_balance
from builder.deploy.profiles import (
    MISSION_TARGETS,
    TargetProfile,
    load_profile,
    parse_override,
    shipped_profiles,
)
from builder.deploy.pytorch import write_pytorch_serve
from builder.deploy.render import plan_text, render_plan
from builder.deploy.sources import mission_plans, plan_for, plan_of_source
from builder.deploy.trtllm_flags import arg_problems, load_flag_set

__all__ = [
    "MISSION_TARGETS",
    "BuildResult",
    "TargetPlan",
    "TargetProfile",
    "TrtllmUnavailable",
    "arg_problems",
    "balanced_partition",
    "build_engines",
    "dry_run_build",
    "load_flag_set",
    "load_profile",
    "mission_plans",
    "parse_override",
    "plan_for",
    "plan_of_source",
    "plan_target",
    "plan_text",
    "pp_balance",
    "render_plan",
    "shipped_profiles",
    "trtllm_build_args",
    "trtllm_status",
    "write_pytorch_serve",
]
