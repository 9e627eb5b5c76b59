"""Architecture: the per-layer plan of a nemotron-nas model and the tensors it implies."""

from builder.arch.plan import (
    AttentionKind,
    FfnKind,
    LayerParams,
    LayerPlan,
    ModelPlan,
    dtype_bytes,
    intermediate_size,
    load_plan,
    parse_config,
    read_config,
)
from builder.arch.presets import PRESETS, preset_config, preset_plan
from builder.arch.tensors import (
    RankTensor,
    Split,
    TensorRule,
    check_parallelism,
    hf_tensor_shapes,
    layer_rules,
    parallelism_problems,
    rank_tensors,
    stage_layers,
)

__all__ = [
    "PRESETS",
    "AttentionKind",
    "FfnKind",
    "LayerParams",
    "LayerPlan",
    "ModelPlan",
    "RankTensor",
    "Split",
    "TensorRule",
    "check_parallelism",
    "dtype_bytes",
    "hf_tensor_shapes",
    "intermediate_size",
    "layer_rules",
    "load_plan",
    "parallelism_problems",
    "parse_config",
    "preset_config",
    "preset_plan",
    "rank_tensors",
    "read_config",
    "stage_layers",
]
